//! The on-store format (normative description: docs/FORMAT.md).
//!
//! - [`seal`]: the sealing primitive every encrypted object uses;
//! - [`pack`]: packs of encrypted blobs with their directory;
//! - [`ids`]: blob, pack, index and snapshot ids.

pub mod ids;
pub mod pack;
pub mod seal;

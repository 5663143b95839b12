//! The on-store format (normative description: docs/FORMAT.md).
//!
//! - [`seal`]: the sealing primitive every encrypted object uses;
//! - [`pack`]: packs of encrypted blobs with their directory;
//! - [`index`]: index files mapping blobs to pack locations;
//! - [`snapshot`], [`tree`]: snapshot manifests and their entries;
//! - [`descriptor`], [`envelope`]: the clear tenant descriptor and wrapped data keys;
//! - [`claim`]: key claims, proof that a key was bound to a tenant;
//! - [`ids`]: blob, pack, index and snapshot ids;
//! - [`shred`]: a shred's step records, kept in the descriptor.

pub mod claim;
pub mod descriptor;
pub mod envelope;
pub mod ids;
pub mod index;
pub mod pack;
pub mod seal;
pub mod shred;
pub mod snapshot;
pub mod tree;

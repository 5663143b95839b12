//! Object stores. Everything custos stores goes through `object_store`:
//! `LocalFileSystem` for the embedded default (wrapped by [`local::LocalStore`]
//! for conditional updates), `InMemory` for tests, `AmazonS3` for S3/MinIO.
//!
//! Tenant data is reached only through a [`TenantStore`], a prefix-scoped view
//! (an `object_store::prefix::PrefixStore`) whose names are typed, so no code
//! path can name another tenant's objects.

pub mod deletions;
pub mod holder;
mod keepalive;
pub mod layout;
pub mod lease;
pub mod local;
pub mod probe;
pub mod readers;
pub mod s3;
pub mod tenant;

use std::sync::Arc;

use object_store::ObjectStore;

pub use layout::ObjectName;
pub use tenant::TenantStore;

/// A store shared by every tenant (and the `audit/`, `certificates/` prefixes).
pub type SharedStore = Arc<dyn ObjectStore>;

/// Opens the in-memory store (tests, examples).
pub fn memory() -> SharedStore {
    Arc::new(object_store::memory::InMemory::new())
}
// The fault injector: unit tests and `test-hooks` builds only (see `crate::hooks`).
#[cfg(any(test, feature = "test-hooks"))]
pub mod faults;

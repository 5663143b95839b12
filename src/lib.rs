//! custos: per-tenant encrypted backups under customer-managed keys, with
//! rotation, restore drills and verifiable crypto-shredding.
//!
//! The modules follow the architecture (see `docs/FORMAT.md` and the README):
//!
//! - [`tenant`]: the validated tenant id every operation carries;
//! - [`keys`]: the key hierarchy: CMK providers (local, AWS KMS), data keys, derivations;
//! - [`format`]: the on-store format: sealed objects, packs, indexes, snapshots, envelopes;
//! - [`store`]: object stores (local, in-memory, S3) and the tenant-scoped view of them;
//! - [`config`]: `custos.toml` and the tenant policies;
//! - [`source`]: what a backup reads: directory trees, command output;
//! - [`repo`]: one tenant's repository: its descriptor, keys, index and snapshots;
//! - [`jobs`]: one module per job (backup, restore, check, forget, prune, …);
//! - [`audit`]: the tamper-evident audit log: hash-chained records, signed Merkle checkpoints;
//! - [`daemon`]: `custos daemon`: scheduled jobs per tenant, under systemd;
//! - [`cli`]: the `custos` command line;
//! - [`hooks`]: where `test-hooks` builds inject faults and crashes (empty otherwise).

pub mod audit;
pub mod beneath;
pub mod cli;
pub mod config;
pub mod error;
pub mod format;
pub mod jobs;
pub mod keys;
pub mod pipeline;
pub mod repo;
pub mod report;
pub mod secure_fs;
pub mod source;
pub mod store;
pub mod tenant;
pub mod util;

pub use error::{Error, Result};
pub use tenant::TenantId;
pub mod context;
pub mod daemon;
// Test machinery: compiled for the crate's own unit tests and with the
// `test-hooks` feature, never into a default (shipped) build. See `hooks`.
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod state;

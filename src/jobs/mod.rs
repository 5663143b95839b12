//! The jobs, one module each. A job takes an opened [`crate::repo::Repo`] (and,
//! when it changes anything, the tenant's lease) and returns a report.

pub mod backup;
pub mod check;
pub mod deletion;
pub mod drill;
pub mod forget;
pub mod prune;
pub mod restore;
pub mod restore_to_store;
pub mod rotate;
pub mod runner;
pub mod shred;

/// Progress callbacks (the CLI draws bars from them on a terminal).
pub trait Progress: Send + Sync {
    fn bytes_read(&self, _n: u64) {}
    fn file_done(&self, _size: u64) {}
}

/// No progress display (daemon, JSON output, tests).
pub struct NoProgress;

impl Progress for NoProgress {}

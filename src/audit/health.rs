//! How often the audit log failed, for the daemon's metrics: a record that
//! could not be written (the action that needed it fails closed, as
//! `audit_unavailable`) and a store copy that could not be brought up to
//! date (the local log has the records; the next append retries). Counted
//! by the log itself, so every writer of the process is seen, whichever
//! clone of the log it holds.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct AuditHealth {
    write_failures: AtomicU64,
    replication_failures: AtomicU64,
}

impl AuditHealth {
    /// Appends that did not write their record (after the record was found well-formed).
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Replications to the store that failed (from an append or `replicate`).
    pub fn replication_failures(&self) -> u64 {
        self.replication_failures.load(Ordering::Relaxed)
    }

    pub(super) fn write_failed(&self) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn replication_failed(&self) {
        self.replication_failures.fetch_add(1, Ordering::Relaxed);
    }
}

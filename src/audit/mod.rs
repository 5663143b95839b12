//! The tamper-evident audit log.
//!
//! Every action that touches tenant data or keys (tenant init, backup,
//! restore, drill, check, forget/prune, rotation, shred, snapshot listings,
//! policy change, lease takeover) is appended as a JSON-lines record that holds the hash of the
//! record before it ([`record`]). The records are also the leaves of an
//! RFC 6962 Merkle tree ([`merkle`]) whose checkpoints (tree size + root) custos
//! signs with its Ed25519 audit key ([`key`]) as C2SP signed notes
//! ([`note`], [`checkpoint`]). The log lives in `<state_dir>/audit` and is
//! replicated under the store's `audit/` prefix ([`log`]).
//!
//! `custos audit verify` ([`verify`]) checks chain, tree and signatures with
//! nothing but the public key; a deletion certificate embeds the
//! [`evidence`] of its audit record (line, inclusion proof, signed
//! checkpoint), which an auditor checks offline the same way.

pub mod checkpoint;
pub mod evidence;
pub mod health;
pub mod key;
pub mod log;
pub mod merkle;
pub mod note;
pub mod pending;
pub mod record;
pub mod verify;

/// Event names for the actions the log records. Every action that touches
/// tenant data or keys is recorded before it starts (`.begin`: if that
/// record cannot be written the action does not run) and after it ends
/// (`.end`, with the outcome), so a crash in between is visible in the log.
pub mod event {
    /// Jobs, each recorded as `<job>.begin` and `<job>.end` (the `.end`
    /// carries `begin_seq`, the sequence number of its `.begin`).
    pub const JOBS: &[&str] = &[
        "backup", "restore", "check", "drill", "forget", "prune", "rotate", "shred",
    ];
    /// Reads of tenant data outside jobs (`custos snapshots`, `custos tenant
    /// show`), recorded as `<access>.begin` and `<access>.end` too.
    pub const ACCESSES: &[&str] = &["snapshots", "tenant.show"];
    /// Before a tenant's keys are created.
    pub const TENANT_INIT_BEGIN: &str = "tenant.init.begin";
    /// A tenant initialised (its key, data key and descriptor exist).
    pub const TENANT_INIT: &str = "tenant.init";
    pub const SHRED_BEGIN: &str = "shred.begin";
    pub const SHRED_END: &str = "shred.end";
    /// Steps of a shred, each recorded before and after: `shred.<step>.begin`
    /// and `shred.<step>.end` with step one of fence, scope, keys, delete,
    /// rewrap, verify, certificate (see docs/shredding.md).
    pub const SHRED_STEPS: &[&str] = &[
        "fence",
        "scope",
        "keys",
        "delete",
        "rewrap",
        "verify",
        "certificate",
    ];
    /// The daemon declined a due shred (legal hold).
    pub const SHRED_REFUSED: &str = "shred.refused";
    pub const POLICY_CHANGE: &str = "policy.change";
    pub const LEASE_TAKEOVER: &str = "lease.takeover";
}

pub use checkpoint::{Checkpoint, SignedCheckpoint};
pub use evidence::{InclusionEvidence, InclusionProof, verify_inclusion_offline};
pub use key::AuditKey;
pub use log::{AuditLog, Receipt, audit_dir};
pub use note::VerifierKey;
pub use record::AuditRecord;
pub use verify::{
    AuditFault, CrossCheck, CrossOutcome, FaultKind, Knowledge, VerifyReport, Witness, verify_dir,
    verify_local_copy, verify_log, verify_store, verify_store_copy,
};

#[cfg(test)]
mod tests {
    use super::event::*;

    #[test]
    fn event_names_are_valid() {
        for e in [
            TENANT_INIT_BEGIN,
            TENANT_INIT,
            SHRED_BEGIN,
            SHRED_END,
            POLICY_CHANGE,
            LEASE_TAKEOVER,
            SHRED_REFUSED,
        ] {
            assert!(super::record::valid_event(e), "{e}");
        }
        for name in JOBS.iter().chain(ACCESSES) {
            for phase in ["begin", "end"] {
                let e = format!("{name}.{phase}");
                assert!(super::record::valid_event(&e), "{e}");
            }
        }
        for step in SHRED_STEPS {
            for phase in ["begin", "end"] {
                let e = format!("shred.{step}.{phase}");
                assert!(super::record::valid_event(&e), "{e}");
            }
        }
    }

    /// Every job kind is recorded under its name.
    #[test]
    fn every_job_kind_is_listed() {
        for job in crate::report::JobKind::ALL {
            if job != crate::report::JobKind::Init {
                assert!(JOBS.contains(&job.as_str()), "{job}");
            }
        }
    }
}

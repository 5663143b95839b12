//! The tamper-evident audit log.
//!
//! Every action that touches tenant data or keys (tenant init, backup,
//! restore, drill, check, forget/prune, rotation, shred, policy change, lease
//! takeover) is appended as a JSON-lines record that holds the hash of the
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
pub mod key;
pub mod log;
pub mod merkle;
pub mod note;
pub mod record;
pub mod verify;

/// Event names for the actions the log records. Destructive actions are
/// two-phase: a `.begin` record before, an `.end` record (with the outcome)
/// after, so a crash in between is visible in the log.
pub mod event {
    pub const TENANT_INIT: &str = "tenant.init";
    pub const BACKUP: &str = "backup";
    pub const RESTORE: &str = "restore";
    pub const DRILL: &str = "drill";
    pub const CHECK: &str = "check";
    pub const FORGET: &str = "forget";
    pub const PRUNE_BEGIN: &str = "prune.begin";
    pub const PRUNE_END: &str = "prune.end";
    pub const ROTATE_BEGIN: &str = "rotate.begin";
    pub const ROTATE_END: &str = "rotate.end";
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
pub use verify::{AuditFault, FaultKind, VerifyReport, verify_dir, verify_log, verify_store};

#[cfg(test)]
mod tests {
    use super::event::*;

    #[test]
    fn event_names_are_valid() {
        for e in [
            TENANT_INIT,
            BACKUP,
            RESTORE,
            DRILL,
            CHECK,
            FORGET,
            PRUNE_BEGIN,
            PRUNE_END,
            ROTATE_BEGIN,
            ROTATE_END,
            SHRED_BEGIN,
            SHRED_END,
            POLICY_CHANGE,
            LEASE_TAKEOVER,
            SHRED_REFUSED,
        ] {
            assert!(super::record::valid_event(e), "{e}");
        }
        for step in SHRED_STEPS {
            for phase in ["begin", "end"] {
                let e = format!("shred.{step}.{phase}");
                assert!(super::record::valid_event(&e), "{e}");
            }
        }
    }
}

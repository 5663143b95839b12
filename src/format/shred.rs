//! What a shred records about itself while it runs, kept in the tenant
//! descriptor (`shredding.progress` for a tenant, `epoch_shred` for an epoch).
//!
//! Every step of a shred (scope, key destruction, deletion, verification)
//! stores its outcome here before the next step starts, so a shred that dies
//! at any point is finished by the next run from these records, and the
//! deletion certificate is built from them alone: a re-run after a crash
//! yields the same certificate content, not a second, different one.
//!
//! The wrapped envelopes captured by the scope step (`scope.captured`) are
//! kept only until the shred is certified: they are what verification tries
//! (and must fail) to unwrap. They are ciphertext under the keys being
//! destroyed, so holding them is no weaker than the store's own copies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::envelope::Envelope;
use crate::keys::{DestroyAction, KeyRef, KeyState};

/// The last step a shred completed (informational: resumption goes by which
/// records below are present).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShredStep {
    /// Tenant fenced (or epoch shred started); nothing destroyed yet.
    Fenced,
    Scoped,
    KeysDestroyed,
    Deleted,
    /// Epoch shred with re-wrap: the other epochs moved to a fresh key.
    Rewrapped,
    Verified,
    Certified,
}

impl ShredStep {
    pub fn as_str(self) -> &'static str {
        match self {
            ShredStep::Fenced => "fenced",
            ShredStep::Scoped => "scoped",
            ShredStep::KeysDestroyed => "keys_destroyed",
            ShredStep::Deleted => "deleted",
            ShredStep::Rewrapped => "rewrapped",
            ShredStep::Verified => "verified",
            ShredStep::Certified => "certified",
        }
    }
}

/// Progress and results of one shred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShredProgress {
    pub step: ShredStep,
    /// When the erasure was requested (policy `deletion.requested_at`, else
    /// when the command was given).
    pub requested_at: DateTime<Utc>,
    /// Who ran it (`cli:<user>@<host>`, `daemon:<host>`).
    pub actor: String,
    /// AWS KMS ScheduleKeyDeletion window chosen when the shred began.
    pub pending_window_days: u32,
    /// Keys the operator asked to leave untouched if their ownership cannot
    /// be proven (`--skip-unproven-key`); a resumed run honours them too.
    /// Only ever spares a key, never destroys one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip_unproven: Vec<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeRecord>,
    /// When the first run of the `keys` step began destroying keys: kept
    /// across re-runs, so a certificate states when destruction began even
    /// when a crash made a later run finish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_began_at: Option<DateTime<Utc>>,
    /// Set once every key to destroy was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeyDestruction>>,
    /// When the keys were destroyed: the shred's execution time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion: Option<DeletionRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrap: Option<RewrapRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationRecord>,
}

/// What the shred covers, as listed before anything was destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRecord {
    pub listed_at: DateTime<Utc>,
    pub objects: u64,
    pub bytes: u64,
    /// Hex RFC 6962 Merkle root over the objects (see `jobs::shred::scope`).
    pub merkle_root: String,
    /// Name of the leaf encoding, `custos-shred-scope/1`.
    pub leaf_encoding: String,
    /// Epochs whose envelope is in scope.
    pub envelopes: Vec<u32>,
    /// Seq of the `shred.scope.end` audit record, which holds the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<u64>,
    /// One pack in scope, tried again by verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_pack: Option<SamplePack>,
    /// The envelopes as found (wrapped keys only); cleared once certified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub captured: Vec<Envelope>,
    /// Envelopes in scope that name a key that is not one of the tenant's
    /// (never destroyed by custos: it may be someone else's key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_envelopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplePack {
    pub object: String,
    pub epoch: u32,
}

/// Why a key was destroyed: its role for the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// The tenant's current CMK.
    Current,
    /// The CMK a rotation was moving envelopes to.
    Pending,
    /// A CMK that wrapped this tenant's envelopes before (old envelope
    /// versions may survive in versioned buckets or store backups).
    Previous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestroyOutcome {
    Destroyed,
    /// The provider does not know the key (deleted after its waiting period,
    /// or not reachable under this configuration): nothing left to destroy here.
    NotFound,
    /// The provider showed the key destroyed (or pending deletion or import)
    /// before this shred acted, and nothing proved it the tenant's: custos
    /// did not touch it. `state_after` is the state it found.
    AlreadyDestroyed,
    /// Not destroyed: nothing proved the key the tenant's, and the operator
    /// asked to leave it untouched (`--skip-unproven-key`). The certificate's
    /// guarantee says so.
    NotDestroyed,
}

/// One key destroyed by a shred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDestruction {
    pub reference: KeyRef,
    pub provider: String,
    pub role: KeyRole,
    pub outcome: DestroyOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<DestroyAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<KeyState>,
    /// After this instant the destruction cannot be undone: AWS KMS-generated
    /// material at the key's deletion date; every other destruction when
    /// custos saw it complete (the provider's destroy call that found no
    /// version of the key left returned), which is after a crash the re-run
    /// that finished it, never the time the destruction began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irreversible_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Who held the key and where (provider, region / token and serial /
    /// server), as the provider described itself when the shred ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custody: Option<crate::keys::Custody>,
    /// The provider's names for the objects it destroyed (PKCS#11 labels and
    /// ids, KMIP unique identifiers), to find in the HSM's own audit log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
}

/// An object the store did not delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainedObject {
    pub object: String,
    pub size: u64,
    /// Object Lock retain-until date, where the store reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_until: Option<DateTime<Utc>>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletionRecord {
    pub finished_at: DateTime<Utc>,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
    /// Ciphertext that remains: undecryptable once the keys are gone.
    pub retained: Vec<RetainedObject>,
    /// What the store may still hold beyond its listing (old object versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An epoch shred's move of the remaining envelopes to a fresh key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewrapRecord {
    /// The tenant's current key when the shred began.
    pub from: KeyRef,
    pub to: KeyRef,
    pub epochs: Vec<u32>,
    pub finished_at: DateTime<Utc>,
}

/// One attempt to unwrap a captured envelope after the shred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnwrapCheck {
    pub epoch: u32,
    pub key: KeyRef,
    /// `refused` (the data key is unrecoverable) or `unwrapped` (a failure).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackCheck {
    pub object: String,
    pub epoch: u32,
    /// Whether the pack is still in the store (retained) after deletion.
    pub present: bool,
    /// `undecryptable` (its epoch's data key cannot be unwrapped), `deleted`.
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStateCheck {
    pub reference: KeyRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<KeyState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationRecord {
    pub verified_at: DateTime<Utc>,
    pub passed: bool,
    pub envelopes: Vec<UnwrapCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_sample: Option<PackCheck>,
    pub key_states: Vec<KeyStateCheck>,
    /// Objects still under the shredded prefix (or of the shredded epoch),
    /// the descriptor and the lease excepted.
    pub remaining_objects: u64,
    /// Epoch shred without re-wrap: the envelope object is gone from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_absent: Option<bool>,
}

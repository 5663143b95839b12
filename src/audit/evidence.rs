//! Inclusion evidence: what a deletion certificate embeds so an auditor with
//! only the audit public key can check, offline, that a record is in the log.
//!
//! ```json
//! {
//!   "record": "{\"seq\":41,…}",          the record's line, exactly as logged
//!   "leaf_index": 41,
//!   "tree_size": 42,
//!   "proof": ["<hex hash>", …],           RFC 9162 inclusion path, leaf side first
//!   "checkpoint": "custos/audit/…\n42\n…\n\n— custos/audit/… …\n"
//! }
//! ```
//!
//! Verification ([`verify_inclusion_offline`]): the checkpoint carries a valid
//! signature by the pinned key and names its log; the record line is a
//! canonical audit record whose `seq` is the leaf index; and the proof leads
//! from SHA-256(0x00 ‖ line) at that index to the checkpoint's root.

use serde::{Deserialize, Serialize};

use super::checkpoint::{CheckpointError, SignedCheckpoint};
use super::merkle::{self, Hash, ProofError};
use super::note::{NoteError, VerifierKey};
use super::record::{AuditRecord, RecordError, leaf_hash};

/// An inclusion proof of one leaf in a tree of `tree_size` leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    pub hashes: Vec<Hash>,
}

/// Everything needed to check one record offline against a signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionEvidence {
    pub record: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub proof: Vec<String>,
    pub checkpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    #[error("verifier key: {0}")]
    Key(NoteError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("audit record: {0}")]
    Record(#[from] RecordError),
    #[error("the record is seq {seq} but the proof is for leaf {index}")]
    IndexMismatch { seq: u64, index: u64 },
    #[error("the proof is for a tree of {proof} leaves but the checkpoint has {checkpoint}")]
    SizeMismatch { proof: u64, checkpoint: u64 },
    #[error("malformed proof hash: {0}")]
    BadHash(String),
    #[error("inclusion proof: {0}")]
    Proof(#[from] ProofError),
}

impl InclusionEvidence {
    pub fn new(record_line: &[u8], proof: &InclusionProof, checkpoint: &SignedCheckpoint) -> Self {
        InclusionEvidence {
            record: String::from_utf8_lossy(record_line).into_owned(),
            leaf_index: proof.leaf_index,
            tree_size: proof.tree_size,
            proof: proof.hashes.iter().map(hex::encode).collect(),
            checkpoint: checkpoint.text().to_owned(),
        }
    }

    /// Checks the evidence against the verifier key text; returns the record.
    pub fn verify(&self, verifier_key_text: &str) -> Result<AuditRecord, EvidenceError> {
        let hashes = self
            .proof
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <Hash>::try_from(b).ok())
                    .ok_or_else(|| EvidenceError::BadHash(h.chars().take(80).collect()))
            })
            .collect::<Result<Vec<Hash>, _>>()?;
        let cp = SignedCheckpoint::parse_unverified(self.checkpoint.as_bytes())?;
        if cp.size() != self.tree_size {
            return Err(EvidenceError::SizeMismatch {
                proof: self.tree_size,
                checkpoint: cp.size(),
            });
        }
        verify_inclusion_offline(
            self.record.as_bytes(),
            self.leaf_index,
            &hashes,
            &self.checkpoint,
            verifier_key_text,
        )
    }
}

/// Checks, with nothing but the verifier key, that `record_line` is leaf
/// `index` of the tree whose signed checkpoint is `checkpoint_text`.
pub fn verify_inclusion_offline(
    record_line: &[u8],
    index: u64,
    proof: &[Hash],
    checkpoint_text: &str,
    verifier_key_text: &str,
) -> Result<AuditRecord, EvidenceError> {
    let key = VerifierKey::parse(verifier_key_text).map_err(EvidenceError::Key)?;
    let cp = SignedCheckpoint::verify(checkpoint_text.as_bytes(), &key)?;
    let record = AuditRecord::parse_line(record_line)?;
    if record.seq != index {
        return Err(EvidenceError::IndexMismatch {
            seq: record.seq,
            index,
        });
    }
    merkle::verify_inclusion(&leaf_hash(record_line), index, cp.size(), proof, cp.root())?;
    Ok(record)
}

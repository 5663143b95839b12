//! The evidence a compliance report is computed from: the audit log, verified
//! as `custos audit verify` verifies it, and bound to one signed checkpoint.
//!
//! The log is verified first (chain, Merkle tree, signatures, and the cross
//! checks against the store copy and the state). Then the records the report
//! uses are read again, only as many as the latest signed checkpoint covers,
//! and their Merkle root is compared with that checkpoint's: the report is
//! computed from exactly the records the checkpoint it names signs, even if
//! jobs append to the log meanwhile. A log that does not verify is still
//! reported on (what else is there to show?), but the report says so in its
//! summary and audit section.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::model::{AuditSection, AuditVerification, CheckpointRef};
use crate::audit::log::{CHECKPOINT_DIR, LOG_FILE, LineReader};
use crate::audit::merkle::{self, Frontier};
use crate::audit::{AuditFault, AuditKey, AuditRecord, FaultKind, SignedCheckpoint, audit_dir};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::SharedStore;
use crate::tenant::TenantId;

/// The records and how far they can be trusted.
#[derive(Debug)]
pub struct Evidence {
    /// The records a report reads ([`super::history::relevant`]), in log order.
    pub records: Vec<AuditRecord>,
    /// Every tenant any record names.
    pub tenants: BTreeSet<TenantId>,
    pub audit: AuditSection,
}

/// Verifies the installation's audit log (cross-checked against the store
/// copy) and reads the records its latest signed checkpoint covers.
pub async fn load(cfg: &Config, store: &SharedStore) -> Result<Evidence> {
    let dir = audit_dir(&cfg.state_dir);
    let log = dir.join(LOG_FILE);
    let key = match AuditKey::load(&cfg.audit.key_file) {
        Ok(k) => k,
        // A fresh installation: nothing recorded, so nothing is proven.
        Err(Error::NotFound { .. }) if !log.exists() => {
            return Ok(Evidence {
                records: Vec::new(),
                tenants: BTreeSet::new(),
                audit: AuditSection {
                    log: log.display().to_string(),
                    records: 0,
                    verification: AuditVerification {
                        ok: false,
                        summary: "there is no audit log yet: nothing custos did is recorded".into(),
                        faults: Vec::new(),
                        cross_checks: Vec::new(),
                    },
                    checkpoint: None,
                },
            });
        }
        Err(e) => {
            return Err(Error::Config {
                path: cfg.audit.key_file.clone(),
                message: format!("cannot load the audit key to verify the audit log ({e})"),
            });
        }
    };
    let verifier = key.verifier().clone();
    let report = crate::audit::verify_local_copy(&dir, &verifier, Some(store), &[]).await?;
    let signed = report.latest_checkpoint;
    let (d, v) = (dir.clone(), verifier.clone());
    let (read, checkpoint, mut faults) =
        tokio::task::spawn_blocking(move || read_signed(&d, &v, signed))
            .await
            .map_err(|e| Error::Internal(format!("audit reader failed: {e}")))??;
    faults.splice(0..0, report.faults.iter().cloned());
    let ok = faults.is_empty();
    let summary = match faults.first() {
        None => "no faults".to_owned(),
        Some(f) if faults.len() == 1 => format!("1 fault: {}", f.message),
        Some(f) => format!("{} faults, the first: {}", faults.len(), f.message),
    };
    Ok(Evidence {
        audit: AuditSection {
            log: log.display().to_string(),
            records: read.count,
            verification: AuditVerification {
                ok,
                summary,
                faults,
                cross_checks: report.cross_checks,
            },
            checkpoint: checkpoint.map(|cp| CheckpointRef {
                size: cp.size(),
                root: hex::encode(cp.root()),
                text: cp.text().to_owned(),
                verifier: verifier.to_string(),
            }),
        },
        records: read.records,
        tenants: read.tenants,
    })
}

/// What [`read_signed`] kept of the records it read.
struct Read {
    records: Vec<AuditRecord>,
    tenants: BTreeSet<TenantId>,
    count: u64,
}

/// Reads the first `signed` records (all of them when no checkpoint is
/// valid) and checks that their root is the signed one. Lines that do not
/// parse are skipped: verification has already named them.
fn read_signed(
    dir: &Path,
    verifier: &crate::audit::VerifierKey,
    signed: Option<u64>,
) -> Result<(Read, Option<SignedCheckpoint>, Vec<AuditFault>)> {
    let mut faults = Vec::new();
    let checkpoint = match signed {
        Some(size) => {
            let path: PathBuf = dir.join(CHECKPOINT_DIR).join(size.to_string());
            let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            match SignedCheckpoint::verify(&text, verifier) {
                Ok(cp) => Some(cp),
                Err(e) => {
                    faults.push(fault(
                        FaultKind::BadSignature,
                        Some(size),
                        format!("checkpoint {size} no longer verifies: {e}"),
                    ));
                    None
                }
            }
        }
        None => None,
    };
    let path = dir.join(LOG_FILE);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut reader = LineReader::open(&path, 0, len).map_err(|e| Error::io(&path, e))?;
    let limit = checkpoint.as_ref().map(SignedCheckpoint::size);
    let mut frontier = Frontier::new();
    let mut read = Read {
        records: Vec::new(),
        tenants: BTreeSet::new(),
        count: 0,
    };
    let mut line = Vec::new();
    while limit.is_none_or(|n| frontier.size() < n)
        && let Some(terminated) = reader
            .next_line(&mut line)
            .map_err(|e| Error::io(&path, e))?
    {
        if !terminated {
            break; // an append in progress
        }
        frontier.push(merkle::leaf_hash(&line));
        read.count += 1;
        // Only what a report reads stays in memory (no `.begin` records).
        if let Ok(r) = AuditRecord::from_line(&line)
            && let Some(t) = &r.tenant
        {
            if !read.tenants.contains(t) {
                read.tenants.insert(t.clone());
            }
            if super::history::relevant(&r.event) {
                read.records.push(r);
            }
        }
    }
    if let Some(cp) = &checkpoint
        && (frontier.size() != cp.size() || &frontier.root() != cp.root())
    {
        faults.push(fault(
            FaultKind::RootMismatch,
            Some(cp.size()),
            format!(
                "the first {} records read for the report do not have the root checkpoint {} signs (the log changed while it was read)",
                frontier.size(),
                cp.size()
            ),
        ));
    }
    Ok((read, checkpoint, faults))
}

fn fault(kind: FaultKind, checkpoint: Option<u64>, message: String) -> AuditFault {
    AuditFault {
        seq: None,
        checkpoint,
        kind,
        message,
    }
}

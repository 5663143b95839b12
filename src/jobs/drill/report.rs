//! The drill report: one document per drill, passed or failed, which is the
//! job report's `result`, the CLI's output and the source of the
//! `drill.finished` event and the `custos_drill_*` gauges, so all of them
//! agree by construction.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::command::VerifyCommandResult;
use super::{DrillOptions, Scope, SnapshotPick};
use crate::error::{Error, ErrorKind};
use crate::format::ids::SnapshotId;
use crate::format::snapshot::Snapshot;
use crate::jobs::restore::RestoreReport;
use crate::report::{JobMetrics, JobOutput};
use crate::tenant::TenantId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillOutcome {
    Passed,
    Failed,
}

/// Why a drill failed: the machine-readable `reason` of reports, events and
/// the CLI's JSON (and the job report's `error_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillReason {
    /// An object failed authentication or hashing (packs, index, snapshot,
    /// tree), was sealed for another tenant or epoch, was rolled back, or a
    /// restored file does not match the manifest.
    CorruptObject,
    /// An object the snapshot needs is not in the store.
    MissingObject,
    /// The tenant's data key could not be unwrapped: the CMK is disabled,
    /// destroyed, unreachable or refuses the envelope, or the epoch was shredded.
    KeyUnavailable,
    /// The verify command exited non-zero, was killed, timed out, could not
    /// be started, or printed something other than `verify_expect_stdout`.
    VerifyCommandFailed,
    /// The restore took longer than the tenant's RTO.
    RtoExceeded,
    /// There is no snapshot to restore (none at all, none in the window, or
    /// the requested id does not exist; also a tenant never backed up).
    NoSnapshot,
    /// The scratch file system cannot hold the restore plus its reserve.
    InsufficientSpace,
    /// Another job holds the tenant's lease (`lease_contended`), or the
    /// drill's reader record lapsed (`reader_lost`): retry.
    LeaseContended,
    /// The tenant is shredded, being shredded or otherwise fenced
    /// (`tenant_unavailable`, `legal_hold`, `shred_verification_failed`).
    TenantUnavailable,
    /// The store could not be reached or written (`store_error`,
    /// `invalid_store`, `conditional_writes_unsupported`).
    StoreError,
    /// A local file could not be read or written: scratch space, state
    /// directory (`io_error`, `source_error`).
    IoError,
    /// The policy, custos.toml or an argument is invalid (`invalid_policy`,
    /// `invalid_config`, `invalid_argument`, `invalid_tenant_id`).
    InvalidInput,
    /// A key, state or configuration path another local user could change
    /// (`insecure_permissions`): custos refuses to use it.
    InsecurePermissions,
    /// The audit log could not record the drill, or does not verify
    /// (`audit_unavailable`, `audit_verification_failed`): no unrecorded
    /// access to tenant data.
    AuditUnavailable,
    /// The drill was cancelled (daemon shutdown).
    Cancelled,
    /// A bug in custos stopped the drill (a panic, an internal error).
    Internal,
}

impl DrillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillReason::CorruptObject => "corrupt_object",
            DrillReason::MissingObject => "missing_object",
            DrillReason::KeyUnavailable => "key_unavailable",
            DrillReason::VerifyCommandFailed => "verify_command_failed",
            DrillReason::RtoExceeded => "rto_exceeded",
            DrillReason::NoSnapshot => "no_snapshot",
            DrillReason::InsufficientSpace => "insufficient_space",
            DrillReason::LeaseContended => "lease_contended",
            DrillReason::TenantUnavailable => "tenant_unavailable",
            DrillReason::StoreError => "store_error",
            DrillReason::IoError => "io_error",
            DrillReason::InvalidInput => "invalid_input",
            DrillReason::InsecurePermissions => "insecure_permissions",
            DrillReason::AuditUnavailable => "audit_unavailable",
            DrillReason::Cancelled => "cancelled",
            DrillReason::Internal => "internal",
        }
    }

    /// The reason for a crate error. Matched on every variant, without a
    /// catch-all, so a new kind of error must be given a reason here rather
    /// than fall into an untyped one.
    pub fn of_error(e: &Error) -> DrillReason {
        match e {
            Error::Key(_) | Error::KeyOwnershipUnproven { .. } => DrillReason::KeyUnavailable,
            Error::TenantState { state, .. } if state == "epoch_shredded" => {
                DrillReason::KeyUnavailable
            }
            Error::Corrupt { .. } | Error::Foreign { .. } | Error::Rollback { .. } => {
                DrillReason::CorruptObject
            }
            Error::Missing { .. } => DrillReason::MissingObject,
            Error::NotFound { .. } | Error::TenantNotFound { .. } => DrillReason::NoSnapshot,
            Error::InsufficientSpace { .. } => DrillReason::InsufficientSpace,
            // Store and I/O errors carry their own finer kinds: an object that
            // is not there, a full disk.
            Error::Store { .. } | Error::Io { .. } | Error::Source { .. } => match e.kind() {
                ErrorKind::MissingObject => DrillReason::MissingObject,
                ErrorKind::InsufficientSpace => DrillReason::InsufficientSpace,
                _ if matches!(e, Error::Store { .. }) => DrillReason::StoreError,
                _ => DrillReason::IoError,
            },
            Error::StoreConfig { .. } | Error::ConditionalWritesUnsupported { .. } => {
                DrillReason::StoreError
            }
            // Retryable: another job's lock, or this drill's reader record lapsed.
            Error::LeaseContended { .. }
            | Error::ReaderLost { .. }
            | Error::ReadersActive { .. } => DrillReason::LeaseContended,
            Error::TenantState { .. }
            | Error::LegalHold { .. }
            | Error::ShredVerification { .. } => DrillReason::TenantUnavailable,
            Error::InvalidTenant(_)
            | Error::KeyInUse { .. }
            | Error::CertificateInvalid { .. }
            | Error::InvalidArgument(_)
            | Error::Config { .. }
            | Error::Policy(_) => DrillReason::InvalidInput,
            Error::InsecurePermissions { .. } => DrillReason::InsecurePermissions,
            Error::AuditUnavailable { .. } | Error::AuditVerification { .. } => {
                DrillReason::AuditUnavailable
            }
            // The scratch directory was tampered with while the drill restored.
            Error::UnsafeTarget { .. } => DrillReason::IoError,
            Error::Cancelled { .. } => DrillReason::Cancelled,
            Error::Internal(_) => DrillReason::Internal,
        }
    }
}

impl std::fmt::Display for DrillReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sampled drill's selection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleInfo {
    /// Files asked for (`--sample N`, `drill.sample_files`).
    pub requested: u32,
    /// Files chosen (fewer when the snapshot has fewer), including `always`.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Files in the snapshot.
    pub population: u64,
    /// Files named by the verify command, restored whatever the sample.
    pub always: Vec<String>,
}

/// Where the drill restored to, and the space check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchInfo {
    /// The directory the private scratch directory is created in.
    pub parent: PathBuf,
    /// The private scratch directory (0700), once created.
    pub dir: Option<PathBuf>,
    /// Free bytes on the scratch file system before the restore.
    pub available_bytes: Option<u64>,
    /// Bytes the drill needed free: what it restores plus the reserve.
    pub required_bytes: Option<u64>,
    pub reserve_bytes: u64,
    /// Left in place (`--keep`).
    pub kept: bool,
    /// Removed after the drill.
    pub removed: bool,
}

/// The report of one drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub tenant: TenantId,
    pub outcome: DrillOutcome,
    /// Why it failed (absent when it passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DrillReason>,
    /// The crate error kind behind the reason, when an error caused it
    /// (e.g. `key_unavailable` vs `kms_unreachable` behind `key_unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the snapshot was chosen: `latest`, `random within 30d`, or `id <ID>`.
    pub pick: String,
    /// `full` or `sample`.
    pub mode: String,
    /// Seeds the random pick and the sample (below 2^53, exact in JSON).
    pub seed: u64,
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    #[serde(default)]
    pub snapshot_time: Option<DateTime<Utc>>,
    /// Files and bytes in the snapshot (its summary).
    #[serde(default)]
    pub snapshot_files: Option<u64>,
    #[serde(default)]
    pub snapshot_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleInfo>,
    /// Restored by the drill.
    pub files: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Re-read from disk and matched against the manifest (hash and size).
    pub files_verified: u64,
    pub bytes_verified: u64,
    /// From the drill's start (snapshot lookup, key unwrap, index load) until
    /// the last file was in place; compared with the RTO.
    #[serde(default)]
    pub restore_seconds: Option<f64>,
    #[serde(default)]
    pub rto_seconds: Option<f64>,
    /// Absent without an RTO or when the restore did not finish.
    #[serde(default)]
    pub rto_met: Option<bool>,
    /// Time spent re-reading and hashing the restored files.
    #[serde(default)]
    pub verify_seconds: Option<f64>,
    #[serde(default)]
    pub verify_command: Option<VerifyCommandResult>,
    #[serde(default)]
    pub scratch: Option<ScratchInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
}

impl DrillReport {
    pub(super) fn started(tenant: TenantId, opts: &DrillOptions, seed: u64) -> DrillReport {
        let now = Utc::now();
        DrillReport {
            tenant,
            outcome: DrillOutcome::Failed,
            reason: None,
            error_kind: None,
            message: None,
            pick: match &opts.pick {
                SnapshotPick::Latest => "latest".into(),
                SnapshotPick::Random { within } => format!(
                    "random within {}",
                    crate::config::units::format_duration(*within)
                ),
                SnapshotPick::Id(id) => format!("id {id}"),
            },
            mode: match opts.scope {
                Scope::Full => "full".into(),
                Scope::Sample { .. } => "sample".into(),
            },
            seed,
            snapshot: None,
            snapshot_time: None,
            snapshot_files: None,
            snapshot_bytes: None,
            sample: None,
            files: 0,
            bytes: 0,
            dirs: 0,
            symlinks: 0,
            files_verified: 0,
            bytes_verified: 0,
            restore_seconds: None,
            rto_seconds: opts.rto.map(|d| d.as_secs_f64()),
            rto_met: None,
            verify_seconds: None,
            verify_command: None,
            scratch: None,
            warnings: Vec::new(),
            started_at: now,
            finished_at: now,
            duration_seconds: 0.0,
        }
    }

    /// The failed report of a drill stopped before it started (see
    /// [`JobOutput::from_error`]); emits nothing.
    pub fn stopped_by(tenant: &TenantId, e: &Error) -> DrillReport {
        let now = Utc::now();
        DrillReport {
            tenant: tenant.clone(),
            outcome: DrillOutcome::Failed,
            reason: Some(DrillReason::of_error(e)),
            error_kind: Some(e.kind()),
            message: Some(e.to_string()),
            pick: String::new(),
            mode: String::new(),
            seed: 0,
            snapshot: None,
            snapshot_time: None,
            snapshot_files: None,
            snapshot_bytes: None,
            sample: None,
            files: 0,
            bytes: 0,
            dirs: 0,
            symlinks: 0,
            files_verified: 0,
            bytes_verified: 0,
            restore_seconds: None,
            rto_seconds: None,
            rto_met: None,
            verify_seconds: None,
            verify_command: None,
            scratch: None,
            warnings: Vec::new(),
            started_at: now,
            finished_at: now,
            duration_seconds: 0.0,
        }
    }

    pub fn passed_ok(&self) -> bool {
        self.outcome == DrillOutcome::Passed
    }

    pub(super) fn set_snapshot(&mut self, s: &Snapshot) {
        self.snapshot = Some(s.id);
        self.snapshot_time = Some(s.time);
        self.snapshot_files = Some(s.summary.files);
        self.snapshot_bytes = Some(s.summary.bytes_in);
    }

    pub(super) fn set_restored(
        &mut self,
        r: &RestoreReport,
        restore_seconds: f64,
        rto: Option<Duration>,
    ) {
        self.files = r.files;
        self.bytes = r.bytes;
        self.dirs = r.dirs;
        self.symlinks = r.symlinks;
        self.restore_seconds = Some(restore_seconds);
        self.rto_met = rto.map(|rto| restore_seconds <= rto.as_secs_f64());
    }

    pub(super) fn passed(&mut self) {
        self.outcome = DrillOutcome::Passed;
        self.reason = None;
        self.finished_now();
    }

    pub(super) fn failed(
        &mut self,
        reason: DrillReason,
        error_kind: Option<ErrorKind>,
        message: String,
    ) {
        self.outcome = DrillOutcome::Failed;
        self.reason = Some(reason);
        self.error_kind = error_kind;
        self.message = Some(message);
        self.finished_now();
    }

    fn finished_now(&mut self) {
        self.finished_at = Utc::now();
        self.duration_seconds = (self.finished_at - self.started_at)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64();
    }

    /// The `drill.finished` event (stable fields; see `docs/drills.md`).
    pub fn emit(&self) {
        let snapshot = self.snapshot.map(|s| s.to_hex());
        let reason = self.reason.map(|r| r.as_str());
        let verify_exit_code = self.verify_command.as_ref().and_then(|v| v.exit_code);
        match self.outcome {
            DrillOutcome::Passed => tracing::info!(
                event = "drill.finished",
                tenant = %self.tenant,
                snapshot = snapshot.as_deref(),
                outcome = "passed",
                mode = %self.mode,
                seed = self.seed,
                restore_seconds = self.restore_seconds,
                rto_seconds = self.rto_seconds,
                rto_met = self.rto_met,
                verify_seconds = self.verify_seconds,
                verify_exit_code,
                files = self.files,
                bytes = self.bytes,
                "drill of {} passed: snapshot {}, {} files restored and verified in {:.3}s",
                self.tenant,
                snapshot.as_deref().map(|s| &s[..8]).unwrap_or("-"),
                self.files,
                self.restore_seconds.unwrap_or_default()
            ),
            DrillOutcome::Failed => tracing::error!(
                event = "drill.finished",
                tenant = %self.tenant,
                snapshot = snapshot.as_deref(),
                outcome = "failed",
                reason,
                error_kind = self.error_kind.map(ErrorKind::as_str),
                error = self.message.as_deref(),
                mode = %self.mode,
                seed = self.seed,
                restore_seconds = self.restore_seconds,
                rto_seconds = self.rto_seconds,
                rto_met = self.rto_met,
                verify_seconds = self.verify_seconds,
                verify_exit_code,
                files = self.files,
                bytes = self.bytes,
                "drill of {} failed ({}): {}",
                self.tenant,
                reason.unwrap_or(DrillReason::Internal.as_str()),
                self.message.as_deref().unwrap_or("")
            ),
        }
    }
}

impl JobOutput for DrillReport {
    /// Gauges, exported by the daemon as `custos_drill_<name>`: `passed` (1 or
    /// 0), `restore_seconds`, `rto_seconds`, `verify_seconds`,
    /// `verify_command_seconds` (each when measured).
    fn metrics(&self) -> JobMetrics {
        let mut gauges = std::collections::BTreeMap::new();
        gauges.insert("passed".to_owned(), f64::from(u8::from(self.passed_ok())));
        let mut put = |name: &str, v: Option<f64>| {
            if let Some(v) = v {
                gauges.insert(name.to_owned(), v);
            }
        };
        put("restore_seconds", self.restore_seconds);
        put("rto_seconds", self.rto_seconds);
        put("verify_seconds", self.verify_seconds);
        put(
            "verify_command_seconds",
            self.verify_command.as_ref().map(|v| v.duration_seconds),
        );
        JobMetrics {
            bytes_in: Some(self.bytes),
            files: Some(self.files),
            snapshot: self.snapshot.map(|s| s.to_hex()),
            gauges,
            ..Default::default()
        }
    }

    /// What a compliance report cites of a drill: its reason, restore time
    /// against the RTO and the verify command's verdict (not its output).
    fn audit_result(&self) -> Option<serde_json::Value> {
        let verify = self.verify_command.as_ref().map(|v| {
            serde_json::json!({
                "program": v.argv.first(),
                "passed": v.passed,
                "exit_code": v.exit_code,
                "signal": v.signal,
                "timed_out": v.timed_out,
                "not_run": v.not_run.is_some(),
                "stdout_matched": v.stdout_matched,
                "duration_seconds": v.duration_seconds,
            })
        });
        Some(serde_json::json!({
            "outcome": self.outcome,
            "reason": self.reason,
            "mode": self.mode,
            "restore_seconds": self.restore_seconds,
            "rto_seconds": self.rto_seconds,
            "rto_met": self.rto_met,
            "files_verified": self.files_verified,
            "verify_command": verify,
        }))
    }

    fn failure(&self) -> Option<(&'static str, String)> {
        match self.outcome {
            DrillOutcome::Passed => None,
            DrillOutcome::Failed => {
                // Every failed report is given a reason; none would be a bug.
                let reason = self.reason.unwrap_or(DrillReason::Internal);
                Some((reason.as_str(), self.message.clone().unwrap_or_default()))
            }
        }
    }

    /// A run stopped before the drill started (tenant never backed up: no
    /// snapshot; lease held; store down) is a failed drill too, and is
    /// announced as one.
    fn from_error(tenant: &TenantId, error: &Error) -> Option<Self> {
        let report = DrillReport::stopped_by(tenant, error);
        report.emit();
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyError;

    #[test]
    fn errors_map_to_reasons() {
        let cases: Vec<(Error, DrillReason)> = vec![
            (
                Error::corrupt("pack", "bad tag"),
                DrillReason::CorruptObject,
            ),
            (
                Error::Foreign {
                    object: "pack".into(),
                    reason: "other tenant".into(),
                },
                DrillReason::CorruptObject,
            ),
            (
                Error::Rollback {
                    object: "index".into(),
                    reason: "replayed".into(),
                },
                DrillReason::CorruptObject,
            ),
            (Error::missing("pack", "gone"), DrillReason::MissingObject),
            (
                Error::Key(KeyError::Disabled { key: "k".into() }),
                DrillReason::KeyUnavailable,
            ),
            (
                Error::Key(KeyError::Unreachable {
                    endpoint: "kms".into(),
                    message: "timeout".into(),
                }),
                DrillReason::KeyUnavailable,
            ),
            (
                Error::TenantState {
                    tenant: "acme".into(),
                    state: "epoch_shredded".into(),
                    message: "shredded".into(),
                },
                DrillReason::KeyUnavailable,
            ),
            (
                Error::NotFound {
                    what: "snapshot".into(),
                },
                DrillReason::NoSnapshot,
            ),
            (
                Error::TenantNotFound {
                    tenant: "acme".into(),
                },
                DrillReason::NoSnapshot,
            ),
            (
                Error::io("/scratch", std::io::ErrorKind::StorageFull.into()),
                DrillReason::InsufficientSpace,
            ),
            (
                Error::LeaseContended {
                    tenant: "acme".into(),
                    holder: "h".into(),
                    expires: "t".into(),
                },
                DrillReason::LeaseContended,
            ),
            (
                Error::TenantState {
                    tenant: "acme".into(),
                    state: "shredded".into(),
                    message: "shredded on 2026-11-01".into(),
                },
                DrillReason::TenantUnavailable,
            ),
            (
                Error::LegalHold {
                    tenant: "acme".into(),
                    message: "hold".into(),
                },
                DrillReason::TenantUnavailable,
            ),
            (
                Error::store(
                    "get",
                    "tenants/acme/packs/ab",
                    object_store::Error::Generic {
                        store: "S3",
                        source: "connection reset".into(),
                    },
                ),
                DrillReason::StoreError,
            ),
            (
                Error::store(
                    "get",
                    "tenants/acme/packs/ab",
                    object_store::Error::NotFound {
                        path: "tenants/acme/packs/ab".into(),
                        source: "gone".into(),
                    },
                ),
                DrillReason::MissingObject,
            ),
            (
                Error::store(
                    "put",
                    "tenants/acme/locks/lease",
                    object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
                    },
                ),
                DrillReason::InsufficientSpace,
            ),
            (
                Error::StoreConfig {
                    url: "s3://b".into(),
                    message: "m".into(),
                },
                DrillReason::StoreError,
            ),
            (
                Error::ConditionalWritesUnsupported {
                    url: "s3://b".into(),
                    message: "m".into(),
                },
                DrillReason::StoreError,
            ),
            (
                Error::io("/scratch/x", std::io::ErrorKind::PermissionDenied.into()),
                DrillReason::IoError,
            ),
            (Error::Policy("bad".into()), DrillReason::InvalidInput),
            (
                Error::InvalidArgument("bad".into()),
                DrillReason::InvalidInput,
            ),
            (
                Error::Cancelled {
                    what: "drill".into(),
                    reason: "still running at the shutdown timeout".into(),
                },
                DrillReason::Cancelled,
            ),
            (
                Error::Internal("drill of acme panicked".into()),
                DrillReason::Internal,
            ),
        ];
        for (e, want) in cases {
            let reason = DrillReason::of_error(&e);
            assert_eq!(reason, want, "{e}");
            // Stable names: serde and as_str agree, and none is the untyped "error".
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::json!(reason.as_str())
            );
            assert_ne!(reason.as_str(), "error");
        }
    }

    #[test]
    fn a_drill_stopped_by_a_busy_or_shredded_tenant_has_a_typed_reason() {
        let tenant = TenantId::new("acme").unwrap();
        let busy = Error::LeaseContended {
            tenant: "acme".into(),
            holder: "vm:1:ab (backup)".into(),
            expires: "2026-12-01T00:00:00Z".into(),
        };
        let r = DrillReport::stopped_by(&tenant, &busy);
        assert_eq!(r.reason, Some(DrillReason::LeaseContended));
        assert_eq!(r.error_kind, Some(ErrorKind::LeaseContended));
        let (kind, _) = r.failure().unwrap();
        assert_eq!(kind, "lease_contended");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["reason"], "lease_contended");
        let back: DrillReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.reason, Some(DrillReason::LeaseContended));
    }
}

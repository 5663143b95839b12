//! The compliance report as a document: what the JSON format prints as it
//! is (`custos-compliance-report/1`, documented in docs/report.md) and what
//! the HTML and Markdown renderings show.
//!
//! Every figure names the audit records it was computed from (`seq`,
//! `evidence`), and the report names the signed checkpoint those records are
//! covered by, so a reader can check each figure with `custos audit show`
//! and the whole with `custos audit verify`.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Controls;
use crate::tenant::TenantId;

/// The `format` of the JSON document; a change that removes or retypes a
/// field gets a new number.
pub const FORMAT: &str = "custos-compliance-report/1";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub generated_at: DateTime<Utc>,
    pub period: Period,
    pub custos_version: &'static str,
    /// The store the tenants are backed up to (`file:///…`, `s3://…`).
    pub store: String,
    /// The thresholds the controls were held to (`[controls]`).
    pub controls: Thresholds,
    pub summary: Summary,
    pub tenants: Vec<TenantReport>,
    pub audit: AuditSection,
}

impl Report {
    /// The verdict in one line, for the command's and the daemon's messages:
    /// `fail: 4 of 18 controls failed, 2 tenant(s); audit log verified`.
    pub fn one_line(&self) -> String {
        let s = &self.summary;
        format!(
            "{}: {} of {} controls failed, {} tenant(s); audit log {}",
            s.verdict.label(),
            s.failed,
            s.controls,
            s.tenants,
            if s.audit_verified {
                "verified".to_owned()
            } else {
                format!("did NOT verify ({})", self.audit.verification.summary)
            }
        )
    }
}

/// `[controls]`, durations in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    pub backup_max_gap_seconds: f64,
    pub backup_min_success_rate: f64,
    pub drill_max_interval_seconds: f64,
    pub drill_rto_met: bool,
    pub cmk_max_age_seconds: f64,
    pub epoch_max_age_seconds: f64,
    pub read_data_max_age_seconds: f64,
}

impl From<&Controls> for Thresholds {
    fn from(c: &Controls) -> Self {
        Thresholds {
            backup_max_gap_seconds: c.backup_max_gap.as_secs_f64(),
            backup_min_success_rate: c.backup_min_success_rate,
            drill_max_interval_seconds: c.drill_max_interval.as_secs_f64(),
            drill_rto_met: c.drill_rto_met,
            cmk_max_age_seconds: c.cmk_max_age.as_secs_f64(),
            epoch_max_age_seconds: c.epoch_max_age.as_secs_f64(),
            read_data_max_age_seconds: c.read_data_max_age.as_secs_f64(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Period {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    /// Nothing to hold the tenant to (no shred in the period, a control
    /// switched off, a shredded tenant's keys).
    NotApplicable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotApplicable => "not_applicable",
        }
    }

    /// As a person reads it.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::NotApplicable => "N/A",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `fail` when a control failed or the audit log did not verify.
    pub verdict: Verdict,
    pub tenants: usize,
    pub controls: usize,
    pub passed: usize,
    pub failed: usize,
    pub not_applicable: usize,
    /// The audit log the figures come from verified (chain, tree, signatures,
    /// cross-checks).
    pub audit_verified: bool,
}

/// One control of one tenant: a statement, its verdict and why.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    /// Stable id: `backup.rpo`, `backup.success_rate`, `drill.frequency`,
    /// `drill.passed`, `drill.rto`, `keys.cmk_age`, `keys.epoch_age`,
    /// `deletion.certified`, `integrity.read_data`.
    pub id: &'static str,
    /// The statement held, with its threshold.
    pub title: String,
    pub verdict: Verdict,
    /// What was found, in one sentence.
    pub finding: String,
    /// The audit records (sequence numbers) the verdict rests on.
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantReport {
    pub tenant: TenantId,
    pub verdict: Verdict,
    /// `active`, `shredded` (a tenant shred completed), or `unknown` (no
    /// audit record of the tenant).
    pub state: &'static str,
    /// The tenant's policy as it is now, for context (`None`: no policy
    /// file, or one that does not load: `policy_error`).
    pub policy: Option<PolicyFacts>,
    pub policy_error: Option<String>,
    /// The controls and the figures they were judged on.
    #[serde(flatten)]
    pub assessment: Assessment,
}

/// Every control of one tenant and the figures they were judged on
/// (`controls::evaluate`).
#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    pub controls: Vec<Control>,
    pub backups: Backups,
    pub drills: Drills,
    pub keys: Keys,
    pub deletions: Vec<Deletion>,
    pub integrity: Integrity,
}

/// What the tenant's policy promises (not evidence: the audit log is).
#[derive(Debug, Clone, Serialize)]
pub struct PolicyFacts {
    pub file: String,
    pub backup_schedule: Option<String>,
    pub drill_schedule: Option<String>,
    pub rto_seconds: Option<f64>,
    pub cmk_every: Option<String>,
    pub epoch_every: Option<String>,
}

/// A time and the audit record it comes from.
#[derive(Debug, Clone, Serialize)]
pub struct Cited {
    pub time: DateTime<Utc>,
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backups {
    /// Backup runs that ended in the period (`backup.end` records).
    pub runs: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// `succeeded / runs`; `None` without runs.
    pub success_rate: Option<f64>,
    pub last_success: Option<LastBackup>,
    /// The longest time without a successful backup that overlaps the
    /// period (the achieved recovery point objective), in seconds.
    pub achieved_rpo_seconds: Option<f64>,
    /// Every such time longer than `backup_max_gap`.
    pub gaps: Vec<Gap>,
    pub failures: Vec<Failure>,
    /// The `backup.end` records of the period.
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastBackup {
    pub time: DateTime<Utc>,
    pub seq: u64,
    pub snapshot: Option<String>,
}

/// A time without a successful backup (or a passed drill): from the record
/// that ended the previous one (or created the tenant) to the record of the
/// next one, or to the end of the period (`until_seq` null).
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub from: DateTime<Utc>,
    pub from_seq: Option<u64>,
    pub until: DateTime<Utc>,
    pub until_seq: Option<u64>,
    pub seconds: f64,
}

/// A failed run.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub time: DateTime<Utc>,
    pub seq: u64,
    pub error_kind: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drills {
    /// The drills that ended in the period, oldest first.
    pub drills: Vec<Drill>,
    pub passed: usize,
    pub failed: usize,
    /// The last passed drill (also before the period).
    pub last_passed: Option<Cited>,
    /// Times longer than `drill_max_interval` without a passed drill.
    pub gaps: Vec<Gap>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drill {
    pub time: DateTime<Utc>,
    /// The `drill.end` record.
    pub seq: u64,
    pub begin_seq: Option<u64>,
    /// `passed` or `failed`.
    pub outcome: String,
    /// Why it failed (`verify_command_failed`, `rto_exceeded`, …).
    pub reason: Option<String>,
    pub snapshot: Option<String>,
    pub mode: Option<String>,
    pub restore_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
    pub rto_met: Option<bool>,
    pub verify_command: Option<VerifyCommand>,
    /// False for a drill recorded by a custos that did not log its figures
    /// (before compliance reports): only its outcome is known.
    pub figures_recorded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyCommand {
    pub program: Option<String>,
    pub passed: bool,
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub not_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Keys {
    /// The tenant's CMK now (by the audit log).
    pub cmk: Option<Cmk>,
    /// Every CMK the tenant has had in this lineage, the current one first.
    pub keys: Vec<KeyCustody>,
    pub epochs: Vec<Epoch>,
    /// Rotations in the period, oldest first.
    pub rotations: Vec<Rotation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cmk {
    pub key: String,
    /// When it was created, given new material or replaced the previous key.
    pub since: DateTime<Utc>,
    pub since_seq: u64,
    /// `created`, `rotated` (new material) or `replaced`.
    pub by: &'static str,
    pub age_days: f64,
}

/// A key, who holds it, and its state as its provider reports it now (not
/// from the audit log: asked when the report is made).
#[derive(Debug, Clone, Serialize)]
pub struct KeyCustody {
    pub key: String,
    /// `current`, `previous`.
    pub role: &'static str,
    pub provider: Option<String>,
    pub holder: Option<String>,
    /// Whether key operations leave this host.
    pub network: Option<bool>,
    /// `enabled`, `disabled`, `destroyed`, …, or `None` when it could not be asked.
    pub state: Option<String>,
    pub error: Option<String>,
    /// `[residency]`: `allowed`, or the rule it breaks.
    pub residency: String,
    /// The record that bound it to the tenant.
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: u32,
    pub created_at: DateTime<Utc>,
    pub created_seq: u64,
    pub age_days: f64,
    /// `current`, `retired` or `shredded`.
    pub state: &'static str,
    pub shredded_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    pub time: DateTime<Utc>,
    /// The `rotate.end` record.
    pub seq: u64,
    /// `cmk`, `replace_cmk`, `new_epoch`, or `unrecorded` (a custos that
    /// did not log what it rotated).
    pub action: String,
    pub key_before: Option<String>,
    pub key_after: Option<String>,
    pub epoch_before: Option<u32>,
    pub epoch_after: Option<u32>,
    pub envelopes_rewrapped: Option<u64>,
}

/// A shred of the tenant or of one of its epochs.
#[derive(Debug, Clone, Serialize)]
pub struct Deletion {
    pub certificate_id: String,
    /// `tenant` or `epoch`.
    pub subject: &'static str,
    pub epoch: Option<u32>,
    pub requested_at: DateTime<Utc>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    /// `keys_destroyed`, `envelope_deleted`, … (from the certificate record).
    pub guarantee: Option<String>,
    /// The shred's own verification (`shred.verify.end`): nothing unwraps.
    pub verified: Option<bool>,
    /// The certificate was issued and stored (`shred.certificate.end`).
    pub certified: bool,
    /// The stored certificate, checked now: `valid`, `invalid`, `missing`,
    /// `unavailable` (the store could not be read) or `not_issued`.
    pub certificate_status: &'static str,
    pub certificate_message: Option<String>,
    /// Every record of the shred (its steps).
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Integrity {
    /// Checks that ended in the period, oldest first.
    pub checks: Vec<Check>,
    /// The newest set of read-data checks that read every pack: one full
    /// `--read-data`, or every slice of a `--read-data-subset` round.
    pub read_data_complete: Option<Coverage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub time: DateTime<Utc>,
    pub seq: u64,
    pub outcome: String,
    /// `none`, `all` or `n/of`; `None` when not recorded (an older custos,
    /// or a check that failed before reporting).
    pub read_data: Option<String>,
    pub packs: Option<u64>,
    pub packs_read: Option<u64>,
    pub faults: Option<u64>,
    pub error_kind: Option<String>,
}

/// Every pack read and verified: by which checks, as of when.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    /// The oldest check of the set: every pack was read at or after it.
    pub since: DateTime<Utc>,
    /// `all`, or the slices `1/4, 2/4, …`.
    pub reads: Vec<String>,
    pub evidence: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditSection {
    /// The log the figures come from (`<state_dir>/audit/log.jsonl`).
    pub log: String,
    /// Records read (the log may have grown since; the report used those
    /// the checkpoint covers).
    pub records: u64,
    pub verification: AuditVerification,
    /// The signed checkpoint the report was computed against.
    pub checkpoint: Option<CheckpointRef>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditVerification {
    pub ok: bool,
    /// "no faults", or how many and the first.
    pub summary: String,
    /// The faults (kind, record, message), as `custos audit verify --json` lists them.
    pub faults: Vec<crate::audit::AuditFault>,
    pub cross_checks: Vec<crate::audit::CrossCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRef {
    /// Records covered: the report used records 0 to `size - 1`.
    pub size: u64,
    /// The Merkle root, hex.
    pub root: String,
    /// The signed note, as `custos audit checkpoint` prints it.
    pub text: String,
    /// The verifier key (`custos audit public-key`).
    pub verifier: String,
}

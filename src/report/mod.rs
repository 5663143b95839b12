//! Reporting: structured log events with stable names and fields (the table in
//! the README), one JSON report per job run in the state directory, and the
//! compliance report built from the audit log ([`compliance`]).

pub mod compliance;
pub mod logging;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::state::StateDir;
use crate::tenant::TenantId;

/// The jobs custos runs, as named in events, reports and metrics.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Init,
    Backup,
    Restore,
    Check,
    Forget,
    Prune,
    Drill,
    Rotate,
    Shred,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Init => "init",
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Check => "check",
            JobKind::Forget => "forget",
            JobKind::Prune => "prune",
            JobKind::Drill => "drill",
            JobKind::Rotate => "rotate",
            JobKind::Shred => "shred",
        }
    }

    /// Every job kind, in declaration order.
    pub const ALL: [JobKind; 9] = [
        JobKind::Init,
        JobKind::Backup,
        JobKind::Restore,
        JobKind::Check,
        JobKind::Forget,
        JobKind::Prune,
        JobKind::Drill,
        JobKind::Rotate,
        JobKind::Shred,
    ];

    /// The kind named `name` (as [`JobKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The headline numbers of a job, lifted into `job.finished` events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobMetrics {
    pub bytes_in: Option<u64>,
    pub bytes_stored: Option<u64>,
    pub files: Option<u64>,
    pub snapshot: Option<String>,
    /// Job-specific gauges, exported as `custos_<job>_<name>` (e.g. a drill's
    /// `restore_seconds` and `rto_seconds`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub gauges: std::collections::BTreeMap<String, f64>,
}

/// A job's result type: serialisable, with its headline numbers.
pub trait JobOutput: Serialize {
    fn metrics(&self) -> JobMetrics {
        JobMetrics::default()
    }

    /// A job that ran to completion but whose result is a failure (a drill
    /// that did not pass) returns its reason kind and message: the runner then
    /// records the run as failed while keeping the result and its metrics.
    fn failure(&self) -> Option<(&'static str, String)> {
        None
    }

    /// The figures of this run that the audit log keeps beyond the headline
    /// numbers, as the `result` of its `<job>.end` record: what a compliance
    /// report cites (a drill's restore time and RTO, a check's read-data
    /// coverage, a rotation's keys and epochs). Names keys by reference,
    /// never holds key material or file contents. `None`: nothing more.
    fn audit_result(&self) -> Option<serde_json::Value> {
        None
    }

    /// A job whose every outcome is a report (a drill: "a drill that cannot
    /// verify is a failed drill") turns an error that stopped the run before
    /// or outside the job itself (tenant not initialised, lease held, store
    /// down) into its failed result, so the job report, history and metrics
    /// still carry it. Called by the runner once per such run; the run's
    /// `result` stays the error.
    fn from_error(_tenant: &TenantId, _error: &Error) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

/// The JSON report of one job run (`<state>/reports/<tenant>/<time>-<job>.json`).
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub tenant: TenantId,
    pub job: JobKind,
    pub outcome: Outcome,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub metrics: JobMetrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's own result document.
    pub result: serde_json::Value,
}

pub fn job_started(tenant: &TenantId, job: JobKind) {
    tracing::info!(event = "job.started", tenant = %tenant, job = %job, "{job} of {tenant} started");
}

pub fn job_finished(r: &JobReport) {
    let m = &r.metrics;
    match r.outcome {
        Outcome::Success => tracing::info!(
            event = "job.finished",
            tenant = %r.tenant,
            job = %r.job,
            outcome = "success",
            duration_ms = r.duration_ms,
            bytes_in = m.bytes_in,
            bytes_stored = m.bytes_stored,
            files = m.files,
            snapshot = m.snapshot.as_deref(),
            "{} of {} succeeded in {} ms", r.job, r.tenant, r.duration_ms
        ),
        Outcome::Failure => tracing::error!(
            event = "job.finished",
            tenant = %r.tenant,
            job = %r.job,
            outcome = "failure",
            duration_ms = r.duration_ms,
            bytes_in = m.bytes_in,
            files = m.files,
            snapshot = m.snapshot.as_deref(),
            error_kind = r.error_kind,
            error = r.error.as_deref(),
            "{} of {} failed: {}", r.job, r.tenant, r.error.as_deref().unwrap_or("")
        ),
    }
}

impl StateDir {
    /// Writes a job report; returns its path.
    pub fn write_report(&self, r: &JobReport) -> Result<PathBuf> {
        let dir = self.reports_dir(&r.tenant);
        let name = format!(
            "{}-{}.json",
            r.started_at.format("%Y%m%dT%H%M%S%.3fZ"),
            r.job
        );
        let path = dir.join(name);
        let json = serde_json::to_vec_pretty(r).expect("reports serialise");
        crate::util::write_file_atomic(&path, &json, 0o600).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Reports of a tenant, newest first, optionally only of one job kind.
    pub fn read_reports(
        &self,
        tenant: &TenantId,
        job: Option<JobKind>,
    ) -> Result<Vec<serde_json::Value>> {
        let dir = self.reports_dir(tenant);
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        names.retain(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".json") && job.is_none_or(|j| n.ends_with(&format!("-{j}.json")))
        });
        names.sort();
        names.reverse();
        let mut out = Vec::new();
        for p in names {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            match serde_json::from_slice(&bytes) {
                Ok(v) => out.push(v),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "unreadable job report skipped")
                }
            }
        }
        Ok(out)
    }
}

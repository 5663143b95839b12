//! What the daemon remembers between runs: `<state>/daemon/schedule.json`,
//! the last slot of every job of every tenant (for catch-up after downtime),
//! its last outcome and success (for the metrics after a restart), what
//! it last saw of each tenant's keys, and the compliance report's last slot.
//!
//! Written atomically (temporary file, fsync, rename). A lock file,
//! `<state>/daemon/lock`, holds an exclusive `flock` for the daemon's life:
//! two daemons on one state directory would overwrite each other's memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::plan::Subset;
use super::registry::{KeyInfo, ScheduledJob};
use crate::error::{Error, Result};
use crate::tenant::TenantId;
use crate::util::write_file_atomic;

const VERSION: u32 = 1;

/// How a run (as the scheduler saw it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Success,
    Failure,
    /// Another daemon sharing the store ran this slot.
    Skipped,
    /// The job kind cannot run in this build (counted as a failure).
    Unsupported,
    /// The tenant's lease stayed busy (`--once` gave up waiting; a failure).
    Contended,
    /// Still running when the shutdown timeout ran out (a failure).
    Abandoned,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Success => "success",
            RunOutcome::Failure => "failure",
            RunOutcome::Skipped => "skipped",
            RunOutcome::Unsupported => "unsupported",
            RunOutcome::Contended => "contended",
            RunOutcome::Abandoned => "abandoned",
        }
    }

    pub fn is_failure(self) -> bool {
        !matches!(self, RunOutcome::Success | RunOutcome::Skipped)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobRecord {
    /// The last slot that ran (here or, per its slot mark, elsewhere).
    pub last_slot: Option<DateTime<Utc>>,
    pub last_started: Option<DateTime<Utc>>,
    pub last_finished: Option<DateTime<Utc>>,
    pub last_outcome: Option<RunOutcome>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_data: Option<Subset>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantRecord {
    pub jobs: BTreeMap<ScheduledJob, JobRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyInfo>,
}

/// The scheduled compliance report (`[report] schedule`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportRecord {
    /// The last slot that ran.
    pub last_slot: Option<DateTime<Utc>>,
    pub last_outcome: Option<RunOutcome>,
    /// The files it wrote.
    pub last_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFile {
    pub version: u32,
    #[serde(default)]
    pub tenants: BTreeMap<TenantId, TenantRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportRecord>,
}

impl Default for ScheduleFile {
    fn default() -> Self {
        ScheduleFile {
            version: VERSION,
            tenants: BTreeMap::new(),
            report: None,
        }
    }
}

/// The daemon's state directory, locked for this process.
pub struct DaemonState {
    path: PathBuf,
    pub data: ScheduleFile,
    dirty: bool,
    _lock: File,
}

impl DaemonState {
    /// Opens (creating) `<state_dir>/daemon/`, takes its lock and reads
    /// schedule.json. An unreadable file is set aside (renamed
    /// `schedule.json.unreadable-<time>`) with a warning: the daemon then
    /// treats every job as never run, which runs each once, never skips one.
    pub fn open(state_dir: &Path) -> Result<DaemonState> {
        let dir = state_dir.join("daemon");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join("lock");
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(Error::InvalidArgument(format!(
                    "another custos daemon (pid {}) uses the state directory {}; give each daemon its own state_dir",
                    holder.trim(),
                    state_dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let _ = lock.set_len(0);
        let _ = write!(lock, "{}", std::process::id());
        let path = dir.join("schedule.json");
        let data = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<ScheduleFile>(&bytes) {
                Ok(d) if d.version == VERSION => d,
                other => {
                    let why = match other {
                        Ok(d) => format!("unknown version {}", d.version),
                        Err(e) => e.to_string(),
                    };
                    let aside = dir.join(format!(
                        "schedule.json.unreadable-{}",
                        Utc::now().format("%Y%m%dT%H%M%SZ")
                    ));
                    let _ = std::fs::rename(&path, &aside);
                    tracing::warn!(
                        event = "daemon.state_reset",
                        path = %path.display(),
                        moved_to = %aside.display(),
                        error = %why,
                        "unreadable schedule state set aside; every job counts as never run"
                    );
                    ScheduleFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ScheduleFile::default(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        Ok(DaemonState {
            path,
            data,
            dirty: false,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn job(&self, tenant: &TenantId, job: ScheduledJob) -> Option<&JobRecord> {
        self.data.tenants.get(tenant)?.jobs.get(&job)
    }

    pub fn job_mut(&mut self, tenant: &TenantId, job: ScheduledJob) -> &mut JobRecord {
        self.dirty = true;
        self.data
            .tenants
            .entry(tenant.clone())
            .or_default()
            .jobs
            .entry(job)
            .or_default()
    }

    pub fn report_mut(&mut self) -> &mut ReportRecord {
        self.dirty = true;
        self.data.report.get_or_insert_with(Default::default)
    }

    pub fn set_keys(&mut self, tenant: &TenantId, keys: KeyInfo) {
        let rec = self.data.tenants.entry(tenant.clone()).or_default();
        if rec.keys.as_ref() != Some(&keys) {
            rec.keys = Some(keys);
            self.dirty = true;
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes schedule.json if anything changed since the last write.
    pub fn flush(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&self.data).expect("state serialises");
        write_file_atomic(&self.path, &json, 0o600).map_err(|e| Error::io(&self.path, e))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_locks_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let t = TenantId::new("acme").unwrap();
        let now = Utc::now();
        {
            let mut s = DaemonState::open(dir.path()).unwrap();
            let second = DaemonState::open(dir.path()).err().unwrap();
            assert!(
                second.to_string().contains("another custos daemon"),
                "{second}"
            );
            s.job_mut(&t, ScheduledJob::Backup).last_slot = Some(now);
            s.flush().unwrap();
        }
        let s = DaemonState::open(dir.path()).unwrap();
        assert_eq!(
            s.job(&t, ScheduledJob::Backup).unwrap().last_slot,
            Some(now)
        );
        drop(s);
        std::fs::write(dir.path().join("daemon/schedule.json"), b"{not json").unwrap();
        let s = DaemonState::open(dir.path()).unwrap();
        assert!(s.data.tenants.is_empty());
        let aside = std::fs::read_dir(dir.path().join("daemon"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("schedule.json.unreadable-")
            })
            .count();
        assert_eq!(aside, 1);
    }
}

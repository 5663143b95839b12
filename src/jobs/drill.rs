//! `custos drill`: proves that a tenant's backup restores, and how fast.
//!
//! A drill picks a snapshot (the latest, a random one within a window, or a
//! given id), checks that the scratch file system can hold it, restores it
//! into a private directory (0700) with the ordinary restore engine, then
//! re-reads every restored file from disk and checks it against the manifest
//! (size, and the keyed hash of each blob-sized piece), runs the tenant's
//! verify command, and compares the restore time with the tenant's RTO.
//!
//! Every outcome is a [`DrillReport`]: a drill that fails, or cannot even
//! start, is a failed drill with a reason kind ([`DrillReason`]), never an
//! error that leaves no trace. [`run`] therefore returns `Ok` for failed
//! drills; the job runner records them as failures through
//! [`crate::report::JobOutput::failure`], and a run stopped before the drill
//! started (tenant not initialised, lease held) becomes a failed report
//! through [`crate::report::JobOutput::from_error`]. Each run emits exactly
//! one `drill.finished` event. See `docs/drills.md`.

mod command;
mod report;
mod sample;
mod scratch;
mod verify;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;

pub use self::command::VerifyCommandResult;
pub use self::report::{DrillOutcome, DrillReason, DrillReport, SampleInfo, ScratchInfo};
pub use self::scratch::available_bytes;
pub use self::verify::{Verified, verify_restored};
use super::Progress;
use super::restore::{self, FileSet, RestoreOptions};
use crate::config::{DrillMode, DrillPick, DrillPolicy, VerifyCommand};
use crate::error::{Error, ErrorKind, Result};
use crate::format::snapshot::Snapshot;
use crate::repo::Repo;
use crate::store::lease::LeaseGuard;

/// Which snapshot a drill restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotPick {
    /// The newest snapshot.
    Latest,
    /// A snapshot chosen at random (with the drill's seed) among those taken
    /// within this long before now.
    Random { within: Duration },
    /// A snapshot id or unique prefix (as `custos restore` takes).
    Id(String),
}

/// How much of the snapshot a drill restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every file, directory and symlink.
    Full,
    /// This many files chosen at random (with the drill's seed), plus the
    /// files the verify command names; their directories, no symlinks.
    Sample { files: u32 },
}

/// The check run on the restored data.
#[derive(Debug, Clone)]
pub struct VerifySpec {
    pub command: VerifyCommand,
    /// The command is killed (its whole process group) after this long.
    pub timeout: Duration,
    /// When set, stdout (trimmed) must equal this (trimmed) as well as the
    /// exit status being 0.
    pub expect_stdout: Option<String>,
}

/// What a drill does; [`DrillOptions::from_policy`] gives a tenant's scheduled
/// drill, and the CLI overrides single fields.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub pick: SnapshotPick,
    pub scope: Scope,
    /// Seeds the random pick and the sample; none: a fresh random seed. The
    /// seed used is always in the report, so a drill can be repeated exactly.
    pub seed: Option<u64>,
    pub rto: Option<Duration>,
    pub verify: Option<VerifySpec>,
    /// The directory in which the drill creates its private scratch directory;
    /// none: `$TMPDIR` (else `/tmp`).
    pub scratch: Option<PathBuf>,
    /// Free bytes that must remain on the scratch file system after the restore.
    pub scratch_reserve: u64,
    /// Leave the restored files in place (the report names the directory).
    pub keep: bool,
    /// Replaces the file system's free-space reading (tests; see `docs/drills.md`).
    pub available_bytes_override: Option<u64>,
}

impl DrillOptions {
    pub fn from_policy(p: &DrillPolicy) -> DrillOptions {
        DrillOptions {
            pick: match p.pick {
                DrillPick::Latest => SnapshotPick::Latest,
                DrillPick::Random => SnapshotPick::Random { within: p.within },
            },
            scope: match p.mode {
                DrillMode::Full => Scope::Full,
                DrillMode::Sample => Scope::Sample {
                    files: p.sample_files,
                },
            },
            seed: None,
            rto: p.rto,
            verify: p.verify_command.as_ref().map(|command| VerifySpec {
                command: command.clone(),
                timeout: p.verify_timeout,
                expect_stdout: p.verify_expect_stdout.clone(),
            }),
            scratch: p.scratch.clone(),
            scratch_reserve: p.scratch_reserve,
            keep: false,
            available_bytes_override: None,
        }
    }
}

/// Runs a drill of the repository's tenant. Returns `Ok` for every drill that
/// ran, passed or failed (see the module docs); the caller holds the tenant
/// lease, so prune cannot remove packs under the restore.
pub async fn run(
    repo: &Repo,
    _lease: &LeaseGuard,
    opts: &DrillOptions,
    progress: &dyn Progress,
) -> Result<DrillReport> {
    let seed = opts.seed.unwrap_or_else(sample::fresh_seed);
    let mut drill = Drill {
        repo,
        opts,
        progress,
        clock: Instant::now(),
        seed,
        report: DrillReport::started(repo.tenant().clone(), opts, seed),
        dir: None,
    };
    let result = drill.steps().await;
    Ok(drill.finish(result))
}

/// Why a drill stopped: its reason kind, the crate error kind behind it (if
/// any) and a message.
#[derive(Debug)]
pub(crate) struct Failure {
    reason: DrillReason,
    error_kind: Option<ErrorKind>,
    message: String,
}

impl Failure {
    fn new(reason: DrillReason, message: impl Into<String>) -> Self {
        Failure {
            reason,
            error_kind: None,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            reason: DrillReason::of_error(&e),
            error_kind: Some(e.kind()),
            message: e.to_string(),
        }
    }
}

struct Drill<'a> {
    repo: &'a Repo,
    opts: &'a DrillOptions,
    progress: &'a dyn Progress,
    /// Started with the drill: restore_seconds counts from here.
    clock: Instant,
    seed: u64,
    report: DrillReport,
    /// The scratch directory, once created.
    dir: Option<PathBuf>,
}

impl Drill<'_> {
    async fn steps(&mut self) -> Result<(), Failure> {
        let mut rng = sample::SplitMix64::new(self.seed);
        let snapshot = self.pick(&mut rng).await?;
        self.report.set_snapshot(&snapshot);

        let parent = self.opts.scratch.clone().unwrap_or_else(std::env::temp_dir);
        scratch::ensure_parent(&parent)?;
        if self.opts.scope == Scope::Full {
            self.check_space(&parent, snapshot.summary.bytes_in)?;
        }

        // The snapshot was picked (its listing made) before the index files
        // are listed: every snapshot listed has its index files by then.
        let (keys, index) = tokio::try_join!(
            self.repo.epoch_keys(snapshot.epoch),
            self.repo.load_index_strict()
        )?;
        let only: Option<FileSet> = match self.opts.scope {
            Scope::Full => None,
            Scope::Sample { files } => {
                let always: Vec<String> = self
                    .opts
                    .verify
                    .as_ref()
                    .map(|v| v.command.files().into_iter().map(str::to_owned).collect())
                    .unwrap_or_default();
                let chosen =
                    sample::choose(self.repo, &index, &snapshot, files, &always, &mut rng).await?;
                self.report.sample = Some(chosen.info.clone());
                self.check_space(&parent, chosen.info.bytes)?;
                Some(chosen.files)
            }
        };

        let dir = scratch::create_private(&parent, self.repo.tenant())?;
        self.dir = Some(dir.clone());
        let scratch_info = self.report.scratch.get_or_insert_with(Default::default);
        scratch_info.parent = parent.clone();
        scratch_info.dir = Some(dir.clone());

        let restore_opts = RestoreOptions {
            target: dir.clone(),
            include: Vec::new(),
            overwrite: false,
        };
        let restored = restore::run_with(
            self.repo,
            &index,
            &snapshot,
            &restore_opts,
            only.as_ref(),
            self.progress,
            self.clock,
        )
        .await?;
        let restore_seconds = self.clock.elapsed().as_secs_f64();
        self.report
            .set_restored(&restored, restore_seconds, self.opts.rto);

        let verify_clock = Instant::now();
        let verified = verify_restored(self.repo, &index, keys, &snapshot, &dir, only.as_ref())
            .await
            .inspect_err(|_| {
                self.report.verify_seconds = Some(verify_clock.elapsed().as_secs_f64());
            })?;
        self.report.verify_seconds = Some(verify_clock.elapsed().as_secs_f64());
        self.report.files_verified = verified.files;
        self.report.bytes_verified = verified.bytes;
        if verified.files != restored.files {
            return Err(Failure::new(
                DrillReason::CorruptObject,
                format!(
                    "the restore wrote {} files but {} were checked against the manifest",
                    restored.files, verified.files
                ),
            ));
        }

        if let Some(spec) = &self.opts.verify {
            let result = command::run(spec, &dir, self.repo.tenant(), &snapshot.id).await;
            let failed = (!result.passed).then(|| result.failure_message());
            self.report.verify_command = Some(result);
            if let Some(message) = failed {
                return Err(Failure::new(DrillReason::VerifyCommandFailed, message));
            }
        }

        if self.report.rto_met == Some(false) {
            let rto = self.opts.rto.expect("rto_met is set only with an RTO");
            return Err(Failure::new(
                DrillReason::RtoExceeded,
                format!(
                    "the restore took {:.3}s, over the RTO of {}",
                    restore_seconds,
                    crate::config::units::format_duration(rto)
                ),
            ));
        }
        Ok(())
    }

    /// Finds the snapshot to restore; every way of finding none is `no_snapshot`.
    async fn pick(&mut self, rng: &mut sample::SplitMix64) -> Result<Snapshot, Failure> {
        let no_snapshot = |e: Error| -> Failure {
            let mut f = Failure::from(e);
            if matches!(
                f.error_kind,
                Some(ErrorKind::NotFound | ErrorKind::TenantNotFound)
            ) {
                f.reason = DrillReason::NoSnapshot;
            }
            f
        };
        match &self.opts.pick {
            SnapshotPick::Latest => self.repo.find_snapshot("latest").await.map_err(no_snapshot),
            SnapshotPick::Id(id) => self.repo.find_snapshot(id).await.map_err(no_snapshot),
            SnapshotPick::Random { within } => {
                let (snaps, faults) = self.repo.list_snapshots().await?;
                for f in &faults {
                    self.report.warnings.push(format!(
                        "unreadable snapshot {} ({}): not a candidate",
                        f.object, f.kind
                    ));
                }
                // A window longer than the calendar reaches means "any snapshot".
                let since = chrono::Duration::from_std(*within)
                    .ok()
                    .and_then(|w| Utc::now().checked_sub_signed(w))
                    .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
                let newest = snaps.last().map(|s| s.time);
                let mut candidates: Vec<Snapshot> =
                    snaps.into_iter().filter(|s| s.time >= since).collect();
                if candidates.is_empty() {
                    // With no readable snapshot at all, an unreadable one is the real story.
                    if newest.is_none() {
                        crate::repo::fault_error(faults)?;
                    }
                    return Err(Failure::new(
                        DrillReason::NoSnapshot,
                        match newest {
                            None => format!("tenant {} has no snapshot", self.repo.tenant()),
                            Some(t) => format!(
                                "tenant {} has no snapshot taken within the last {} (newest: {})",
                                self.repo.tenant(),
                                crate::config::units::format_duration(*within),
                                t.format("%Y-%m-%d %H:%M:%SZ")
                            ),
                        },
                    ));
                }
                let i = rng.below(candidates.len() as u64) as usize;
                Ok(candidates.swap_remove(i))
            }
        }
    }

    /// Refuses the drill unless `need` bytes plus the reserve fit on the scratch file system.
    fn check_space(&mut self, parent: &std::path::Path, need: u64) -> Result<(), Failure> {
        let available = match self.opts.available_bytes_override {
            Some(n) => n,
            None => available_bytes(parent).map_err(|e| Error::io(parent, e))?,
        };
        let required = need.saturating_add(self.opts.scratch_reserve);
        let info = self.report.scratch.get_or_insert_with(Default::default);
        info.parent = parent.to_path_buf();
        info.available_bytes = Some(available);
        info.required_bytes = Some(required);
        info.reserve_bytes = self.opts.scratch_reserve;
        if available < required {
            // The typed error, so that the report's `error_kind` names it as
            // it does a disk that fills up during the restore.
            return Err(Error::InsufficientSpace {
                path: parent.to_path_buf(),
                message: format!(
                    "the scratch file system has {} free; the drill needs {} ({} to restore + {} reserve)",
                    crate::util::human_bytes(available),
                    crate::util::human_bytes(required),
                    crate::util::human_bytes(need),
                    crate::util::human_bytes(self.opts.scratch_reserve),
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Removes the scratch directory (unless kept), settles the outcome and
    /// emits `drill.finished`.
    fn finish(mut self, result: Result<(), Failure>) -> DrillReport {
        if let Some(dir) = &self.dir {
            let info = self.report.scratch.get_or_insert_with(Default::default);
            if self.opts.keep {
                info.kept = true;
            } else {
                match scratch::remove(dir) {
                    Ok(()) => info.removed = true,
                    Err(e) => {
                        tracing::warn!(
                            event = "drill.cleanup_failed",
                            tenant = %self.repo.tenant(),
                            dir = %dir.display(),
                            error = %e,
                            "could not remove the drill's scratch directory"
                        );
                        self.report.warnings.push(format!(
                            "scratch directory {} could not be removed: {e}",
                            dir.display()
                        ));
                    }
                }
            }
        }
        match result {
            Ok(()) => self.report.passed(),
            Err(f) => self.report.failed(f.reason, f.error_kind, f.message),
        }
        self.report.emit();
        self.report
    }
}

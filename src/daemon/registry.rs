//! The job registry: which jobs the daemon schedules, when each is due, and
//! how each runs.
//!
//! Every scheduled run goes through [`Request::run`]: the job runner opens the
//! tenant and takes its lease (writers) or registers a reader record
//! (readers), the slot mark (see [`super::slots`]) decides whether this slot
//! still needs to run (under the lease, or by a reader's conditional claim),
//! the job runs and reports like any other (`job.started` / `job.finished`,
//! a JSON report), and the slot is recorded in the store before the lease
//! or the reader record goes.
//!
//! Adding a job kind takes a few lines: a variant of [`ScheduledJob`] (its
//! position is its priority when several jobs of a tenant are due together),
//! its schedule in [`ScheduledJob::when`], and a launcher in [`launcher`]
//! that builds the job's options from the policy and calls [`Request::run`].
//! A kind without a launcher is never faked: the scheduler logs it once as a
//! `job.unsupported` error and counts each due slot as a failed run.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::plan::{self, Subset, When};
use super::slots::{self, MarkOutcome, SlotMark};
use crate::config::{DeletionState, Policy};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::descriptor::Descriptor;
use crate::jobs::NoProgress;
use crate::jobs::backup::{self, BackupOptions};
use crate::jobs::check::{self, CheckReport};
use crate::jobs::forget::{self, ForgetReport};
use crate::jobs::prune::{self, PruneReport};
use crate::jobs::runner::{Gate, Gated, JobAccess, JobSpec, run_job_gated};
use crate::pipeline::packer::PackerConfig;
use crate::repo::Repo;
use crate::report::{JobKind, JobMetrics, JobOutput, JobReport};
use crate::store::lease::LeaseGuard;

/// The jobs the daemon runs on a schedule. Declaration order is priority:
/// when several jobs of one tenant are due at the same moment (a first start,
/// a catch-up), a backup runs before the check of what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledJob {
    Backup,
    /// `forget` by the retention rules, then `prune` when the policy says so.
    Forget,
    Check,
    Drill,
    Rotate,
    Shred,
}

impl ScheduledJob {
    pub const ALL: [ScheduledJob; 6] = [
        ScheduledJob::Backup,
        ScheduledJob::Forget,
        ScheduledJob::Check,
        ScheduledJob::Drill,
        ScheduledJob::Rotate,
        ScheduledJob::Shred,
    ];

    /// The job kind named in events, reports, metrics and slot marks.
    pub fn kind(self) -> JobKind {
        match self {
            ScheduledJob::Backup => JobKind::Backup,
            ScheduledJob::Forget => JobKind::Forget,
            ScheduledJob::Check => JobKind::Check,
            ScheduledJob::Drill => JobKind::Drill,
            ScheduledJob::Rotate => JobKind::Rotate,
            ScheduledJob::Shred => JobKind::Shred,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.kind().as_str()
    }

    /// Readers (check, drill) take no lease and run beside a writer of
    /// their tenant; writers exclude each other.
    pub fn is_reader(self) -> bool {
        JobAccess::of(self.kind()) == JobAccess::Reader
    }

    /// When the policy wants this job, if at all. An offboarding tenant gets
    /// no new backups; it is shredded once its grace period is over (unless
    /// on legal hold).
    pub fn when(self, policy: &Policy) -> Option<When> {
        let cron = |s: &Option<crate::config::Schedule>| s.clone().map(When::Cron);
        match self {
            ScheduledJob::Backup => match policy.deletion.state {
                DeletionState::Active => cron(&policy.backup.schedule),
                DeletionState::Offboarding => None,
            },
            ScheduledJob::Forget => cron(&policy.retention.schedule),
            ScheduledJob::Check => cron(&policy.check.schedule),
            ScheduledJob::Drill => cron(&policy.drill.schedule),
            ScheduledJob::Rotate => cron(&policy.rotation.schedule),
            // Asked for at the due date and hourly after it, legal hold or
            // not: the launcher decides (and logs a refusal) under the lease.
            ScheduledJob::Shred => match (&policy.deletion.state, policy.deletion.requested_at) {
                (DeletionState::Offboarding, Some(requested)) => {
                    let grace = chrono::Duration::from_std(policy.deletion.grace).ok()?;
                    Some(When::Every {
                        // Past the end of time: never due (checked, never a panic).
                        start: requested.checked_add_signed(grace)?,
                        every: SHRED_RETRY,
                    })
                }
                _ => None,
            },
        }
    }
}

impl std::fmt::Display for ScheduledJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs one scheduled job; see [`launcher`].
pub type Launcher = fn(Request) -> BoxFuture<'static, Launched>;

/// The launcher of each kind; `None` where this build cannot run the kind.
pub fn launcher(job: ScheduledJob) -> Option<Launcher> {
    match job {
        ScheduledJob::Backup => Some(launch_backup),
        ScheduledJob::Forget => Some(launch_forget),
        ScheduledJob::Check => Some(launch_check),
        ScheduledJob::Drill => Some(launch_drill),
        ScheduledJob::Rotate => Some(launch_rotate),
        ScheduledJob::Shred => Some(launch_shred),
    }
}

/// One scheduled run: which tenant (by its policy), which job, which slot.
pub struct Request {
    pub ctx: Context,
    pub policy: Arc<Policy>,
    pub job: ScheduledJob,
    pub slot: DateTime<Utc>,
}

/// What the daemon learns about the tenant's keys at each run (for the key-age metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub key: String,
    pub epoch: u32,
    /// When the current key epoch (data key) was created.
    pub epoch_created_at: DateTime<Utc>,
    /// When the CMK was last rotated by custos, else when the tenant was created.
    pub cmk_since: DateTime<Utc>,
}

impl KeyInfo {
    pub fn of(d: &Descriptor) -> KeyInfo {
        KeyInfo {
            key: d.key.to_string(),
            epoch: d.current_epoch,
            epoch_created_at: d
                .epoch(d.current_epoch)
                .map(|e| e.created_at)
                .unwrap_or(d.created_at),
            cmk_since: d.cmk_rotated_at.unwrap_or(d.created_at),
        }
    }
}

/// How a scheduled run ended.
#[derive(Debug)]
pub enum Launched {
    /// The job ran and was reported (success or failure).
    Ran {
        report: JobReport,
        keys: Option<KeyInfo>,
    },
    /// The tenant's lease is busy (another daemon, or a CLI command): retry later.
    Contended(Error),
    /// Not run, and not a failure: the store says this slot already ran
    /// (another daemon sharing the store), or a shred is not to run (legal
    /// hold, not yet due, already done).
    Declined {
        reason: String,
        mark: Option<SlotMark>,
        /// Leave the slot unrecorded, so the next start, `--once` or reload
        /// asks again at once (a shred waiting on a legal hold or its grace).
        ask_again: bool,
    },
}

/// What a job body returns: its own output, and for `check`, the slice read.
pub struct Body<T> {
    pub output: T,
    pub read_data: Option<Subset>,
}

impl<T> Body<T> {
    pub fn new(output: T) -> Self {
        Body {
            output,
            read_data: None,
        }
    }
}

/// A job's output with the schedule facts added, as it appears in its JSON
/// report (`result.scheduled`).
#[derive(Serialize)]
pub struct Scheduled<T> {
    #[serde(flatten)]
    pub output: T,
    pub scheduled: ScheduleMeta,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScheduleMeta {
    pub slot: DateTime<Utc>,
    pub holder: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_data: Option<Subset>,
}

impl<T: JobOutput> JobOutput for Scheduled<T> {
    fn metrics(&self) -> JobMetrics {
        self.output.metrics()
    }

    fn failure(&self) -> Option<(&'static str, String)> {
        self.output.failure()
    }

    fn audit_result(&self) -> Option<serde_json::Value> {
        self.output.audit_result()
    }
}

#[derive(Default)]
struct Seen {
    keys: Option<KeyInfo>,
    declined_by: Option<SlotMark>,
}

impl Request {
    /// Runs `body` as this slot's job (see the module documentation).
    /// `init`: initialise the tenant with its policy key if it is not yet
    /// (backup). `body` gets the previous slot mark, if any.
    pub async fn run<T, B>(self, init: bool, body: B) -> Launched
    where
        T: JobOutput + Send + 'static,
        B: for<'r> FnOnce(
                &'r Repo,
                &'r LeaseGuard,
                Option<SlotMark>,
            ) -> BoxFuture<'r, Result<Body<T>>>
            + Send
            + 'static,
    {
        let kind = self.job.kind();
        let slot = self.slot;
        let holder = self.ctx.holder.clone();
        // Readers hold no lease: they claim their slot with a conditional write.
        let reader = JobAccess::of(kind) == JobAccess::Reader;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let spec = JobSpec {
            tenant: &self.policy.tenant,
            job: kind,
            policy_key: Some(&self.policy.key),
            init_with: init.then_some(&self.policy.key),
        };
        let seen_gate = seen.clone();
        let claim_holder = holder.clone();
        let gated = run_job_gated(
            &self.ctx,
            spec,
            move |repo, _| {
                async move {
                    seen_gate.lock().expect("not poisoned").keys =
                        Some(KeyInfo::of(repo.descriptor()));
                    let (previous, version) = slots::read_versioned(repo.store(), kind).await?;
                    if let Some(mark) = previous.as_ref().filter(|m| m.covers(slot)) {
                        let reason = format!(
                            "slot {} already ran: {} by {} (finished {})",
                            slot.to_rfc3339(),
                            match mark.outcome {
                                MarkOutcome::Success => "succeeded",
                                MarkOutcome::Failure => "failed",
                                MarkOutcome::Running => "claimed",
                            },
                            mark.holder,
                            mark.finished_at.to_rfc3339()
                        );
                        seen_gate.lock().expect("not poisoned").declined_by = Some(mark.clone());
                        return Ok(Gate::Decline(reason));
                    }
                    let claimed = if reader {
                        let now = Utc::now();
                        let claim = SlotMark {
                            job: kind,
                            slot,
                            holder: claim_holder,
                            started_at: now,
                            finished_at: now,
                            outcome: MarkOutcome::Running,
                            read_data: previous.as_ref().and_then(|m| m.read_data),
                        };
                        match slots::write_conditional(repo.store(), &claim, version).await? {
                            Some(v) => Some(v),
                            None => {
                                return Ok(Gate::Decline(format!(
                                    "slot {} was claimed by another daemon",
                                    slot.to_rfc3339()
                                )));
                            }
                        }
                    } else {
                        None
                    };
                    Ok(Gate::Run((previous, claimed)))
                }
                .boxed()
            },
            move |repo, lease, (previous, claimed), _| {
                async move {
                    let started_at = Utc::now();
                    let previous_read = previous.as_ref().and_then(|m| m.read_data);
                    let result = body(repo, lease, previous).await;
                    let (outcome, read_data) = match &result {
                        // A job that ran and failed (a failed drill) is a failed slot.
                        Ok(b) if b.output.failure().is_some() => (MarkOutcome::Failure, previous_read),
                        Ok(b) => (MarkOutcome::Success, b.read_data),
                        // A slice that failed is read again by the next check.
                        Err(_) => (MarkOutcome::Failure, previous_read),
                    };
                    let mark = SlotMark {
                        job: kind,
                        slot,
                        holder: holder.clone(),
                        started_at,
                        finished_at: Utc::now(),
                        outcome,
                        read_data,
                    };
                    let written = match claimed {
                        // A reader replaces its own claim, if it is still there.
                        Some(v) => slots::write_conditional(repo.store(), &mark, Some(v))
                            .await
                            .and_then(|w| {
                                w.map(|_| ()).ok_or_else(|| {
                                    Error::Internal("the slot's claim was replaced".into())
                                })
                            }),
                        // Never record a slot under a lease that is no longer ours.
                        None if lease.ensure_held().is_ok() => {
                            slots::write(repo.store(), &mark).await
                        }
                        None => Ok(()),
                    };
                    if let Err(e) = written {
                        tracing::warn!(
                            event = "schedule.mark_failed",
                            tenant = %repo.tenant(),
                            job = %kind,
                            error = %e,
                            "could not record the slot in the store; another daemon may run it again"
                        );
                    }
                    result.map(|b| Scheduled {
                        output: b.output,
                        scheduled: ScheduleMeta {
                            slot,
                            holder,
                            read_data: b.read_data,
                        },
                    })
                }
                .boxed()
            },
        )
        .await;
        let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
        match gated {
            Gated::Ran(run) => Launched::Ran {
                report: run.report,
                keys: seen.keys,
            },
            Gated::Contended(e) => Launched::Contended(e),
            Gated::Declined(reason) => Launched::Declined {
                reason,
                mark: seen.declined_by,
                ask_again: false,
            },
        }
    }
}

fn launch_backup(req: Request) -> BoxFuture<'static, Launched> {
    let opts = BackupOptions::from_policy(&req.policy);
    req.run(true, move |repo, lease, _| {
        async move {
            let report = backup::run(repo, lease, opts, &NoProgress).await?;
            Ok(Body::new(report))
        }
        .boxed()
    })
    .boxed()
}

/// What a scheduled `forget` (and its `prune`) reports.
#[derive(Debug, Serialize)]
pub struct ForgetPruneReport {
    pub forget: ForgetReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneReport>,
}

impl JobOutput for ForgetPruneReport {
    fn metrics(&self) -> JobMetrics {
        let mut m = self.prune.as_ref().map(|p| p.metrics()).unwrap_or_default();
        m.gauges
            .insert("snapshots_kept".into(), self.forget.kept as f64);
        m.gauges
            .insert("snapshots_removed".into(), self.forget.removed as f64);
        if let Some(p) = &self.prune {
            m.gauges.insert("bytes_freed".into(), p.bytes_freed as f64);
        }
        m
    }
}

fn launch_forget(req: Request) -> BoxFuture<'static, Launched> {
    let rules = req.policy.retention.rules.clone();
    let then_prune = req.policy.retention.prune;
    let packer = PackerConfig::for_policy(Some(&req.policy));
    req.run(false, move |repo, lease, _| {
        async move {
            let forget = forget::run(repo, lease, &rules).await?;
            let prune = match then_prune {
                true => Some(prune::run(repo, lease, packer).await?),
                false => None,
            };
            Ok(Body::new(ForgetPruneReport { forget, prune }))
        }
        .boxed()
    })
    .boxed()
}

fn launch_check(req: Request) -> BoxFuture<'static, Launched> {
    let fraction = req.policy.check.read_data_fraction;
    req.run(false, move |repo, _, previous| {
        async move {
            let (read, subset) =
                plan::check_read_data(fraction, previous.and_then(|m| m.read_data));
            let report = check::run(repo, read).await?;
            faults_are_failures(&report)?;
            Ok(Body {
                output: report,
                read_data: subset,
            })
        }
        .boxed()
    })
    .boxed()
}

fn launch_drill(req: Request) -> BoxFuture<'static, Launched> {
    let opts = crate::jobs::drill::DrillOptions::from_policy(&req.policy.drill);
    req.run(false, move |repo, lease, _| {
        async move {
            let report = crate::jobs::drill::run(repo, lease, &opts, &NoProgress).await?;
            Ok(Body::new(report))
        }
        .boxed()
    })
    .boxed()
}

/// What a scheduled rotation did: each rotation that was due (none is fine).
#[derive(Debug, Serialize)]
pub struct ScheduledRotation {
    pub rotations: Vec<crate::jobs::rotate::RotateReport>,
}

impl JobOutput for ScheduledRotation {
    /// Each rotation as a CLI `rotate` records its one (an empty list: none was due).
    fn audit_result(&self) -> Option<serde_json::Value> {
        let rotations: Vec<_> = self.rotations.iter().map(|r| r.audit_entry()).collect();
        Some(serde_json::json!({ "rotations": rotations }))
    }

    fn metrics(&self) -> JobMetrics {
        let mut m = JobMetrics {
            bytes_stored: Some(self.rotations.iter().map(|r| r.bytes_written).sum()),
            ..Default::default()
        };
        m.gauges
            .insert("rotations".into(), self.rotations.len() as f64);
        m
    }
}

/// Runs the rotations the policy makes due (`rotation.cmk_every`,
/// `rotation.epoch_every`), and finishes an interrupted CMK replacement first.
fn launch_rotate(req: Request) -> BoxFuture<'static, Launched> {
    let policy = req.policy.rotation.clone();
    req.run(false, move |repo, lease, _| {
        async move {
            let mut rotations = Vec::new();
            for action in crate::jobs::rotate::due(repo.descriptor(), &policy, Utc::now()) {
                rotations.push(crate::jobs::rotate::run(repo, lease, &action).await?);
            }
            Ok(Body::new(ScheduledRotation { rotations }))
        }
        .boxed()
    })
    .boxed()
}

/// How often an offboarded tenant's shred is asked for again until it is done.
const SHRED_RETRY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Shreds an offboarded tenant whose grace period is over. The decision
/// (due, resume, legal hold, not yet, done) is read first; only a shred that
/// should run takes the lease and produces a job report. A legal hold is
/// logged (`shred.refused`) each time the daemon asks.
fn launch_shred(req: Request) -> BoxFuture<'static, Launched> {
    async move {
        match crate::jobs::shred::decide(&req.ctx, &req.policy, Utc::now()).await {
            Ok(d) if !d.should_run() => {
                return Launched::Declined {
                    reason: format!("shred not run: {d:?}"),
                    mark: None,
                    ask_again: !matches!(d, crate::jobs::shred::ShredDecision::Shredded { .. }),
                };
            }
            // Run it (or fail it, reported like any job) under the lease.
            _ => {}
        }
        let shred = crate::jobs::shred::ShredRequest::from_policy(&req.policy, &req.ctx.actor);
        req.run(false, move |repo, lease, _| {
            async move {
                Ok(Body::new(
                    crate::jobs::shred::run(repo, lease, &shred).await?,
                ))
            }
            .boxed()
        })
        .await
    }
    .boxed()
}

/// A scheduled check that finds faults is a failed job (the CLI exits 1):
/// the error names the first fault and counts the rest.
fn faults_are_failures(report: &CheckReport) -> Result<()> {
    let Some(first) = report.faults.first() else {
        return Ok(());
    };
    let mut first = first.clone();
    let more = report.faults.len() - 1;
    if more > 0 {
        first.message = format!(
            "{} (and {more} more fault(s); run `custos check` for all)",
            first.message
        );
    }
    crate::repo::fault_error(vec![first])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_slots() {
        assert_eq!(ScheduledJob::Forget.kind(), JobKind::Forget);
        for job in ScheduledJob::ALL {
            assert_eq!(job.as_str(), job.kind().as_str());
        }
        // Every scheduled kind has a launcher in this build.
        for job in ScheduledJob::ALL {
            assert!(launcher(job).is_some(), "{job} has no launcher");
        }
        let err = faults_are_failures(&CheckReport {
            faults: vec![
                crate::repo::Fault {
                    object: "tenants/a/packs/00/x".into(),
                    kind: crate::error::ErrorKind::CorruptObject,
                    message: "bad".into(),
                };
                3
            ],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.kind(), "corrupt_object");
        assert!(err.to_string().contains("and 2 more fault(s)"), "{err}");
    }
}

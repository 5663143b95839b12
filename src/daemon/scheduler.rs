//! The scheduler loop: plans every job of every tenant, starts each when its
//! slot (plus jitter) comes, at most one writer per tenant (readers, check
//! and drill, run beside it) and `max_concurrent_jobs` in all, and reacts to
//! job completions and signals.
//!
//! One task owns all scheduling state, so there are no locks: jobs run in
//! their own tasks (a [`JoinSet`]) and come back to the loop when they end.
//! The loop sleeps until the next start or the next tick, whichever is first;
//! each time round it stamps the health tick, pings the systemd watchdog and
//! writes the state file if it changed (at most once a second).
//!
//! Shutdown follows tokio's mini-redis: a signal stops new starts, running
//! jobs get `shutdown_timeout` to finish, then are abandoned (aborted); the
//! HTTP endpoint is told through a watch channel, and the caller waits for it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::{AbortHandle, JoinError, JoinSet};

use super::clock::{Clock, SystemClock};
use super::metrics::Metrics;
use super::notify::Notifier;
use super::plan;
use super::policies::{self, Policies};
use super::queue::{Key, Queue, Replan};
use super::registry::{self, Launched, Request, ScheduledJob};
use super::reporting::{self, ReportRun, ReportTimer};
use super::state::{DaemonState, RunOutcome};
use crate::config::Config;
use crate::context::Context;
use crate::error::{Error, ErrorKind};
use crate::report::{JobReport, Outcome};
use crate::tenant::TenantId;

/// The signals the daemon handles, registered before it reports ready so
/// none is lost.
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// One run as the scheduler saw it (the `--once` report).
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub tenant: TenantId,
    pub job: ScheduledJob,
    pub slot: DateTime<Utc>,
    pub outcome: RunOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The job's `error_kind`, or its drill's reason (a string: the job
    /// report's label, see `JobOutput::failure`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// One line: what the job did, or why it failed.
    pub detail: String,
}

/// What a daemon run did, returned when it stops.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub tenants: usize,
    pub runs: Vec<RunRecord>,
    /// Policy problems refused (each a `policy.rejected` event).
    pub policies_rejected: usize,
    /// Jobs still running at the shutdown timeout.
    pub abandoned: usize,
    /// The next planned start when nothing was due (`--once`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The compliance report written (`--once`, when `[report] schedule` made one due).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportRun>,
}

impl Summary {
    /// True when a run failed or a policy was refused.
    pub fn failed(&self) -> bool {
        self.policies_rejected > 0
            || self.runs.iter().any(|r| r.outcome.is_failure())
            || self.report.as_ref().is_some_and(|r| r.outcome.is_failure())
    }

    pub fn count(&self, outcome: RunOutcome) -> usize {
        self.runs.iter().filter(|r| r.outcome == outcome).count()
    }
}

struct Running {
    job: ScheduledJob,
    slot: DateTime<Utc>,
    generation: u64,
    since: Instant,
    abort: AbortHandle,
}

type TaskOutput = (TenantId, ScheduledJob, DateTime<Utc>, u64, Launched);

pub struct Scheduler {
    ctx: Context,
    config: Config,
    once: bool,
    policies: Policies,
    /// What starts when (pure: no I/O, unit-tested on its own).
    queue: Queue,
    clock: Arc<dyn Clock>,
    running: HashMap<Key, Running>,
    tasks: JoinSet<TaskOutput>,
    task_keys: HashMap<tokio::task::Id, (Key, DateTime<Utc>)>,
    state: DaemonState,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    unsupported_logged: HashSet<Key>,
    summary: Summary,
    tick: Duration,
    last_flush: Instant,
    stopping: bool,
    started: Instant,
    runs_total: u64,
    /// The compliance report's schedule (`[report] schedule`), and its run.
    report: Option<ReportTimer>,
    report_task: reporting::Running,
}

/// Longest wait between two retries of a busy lease.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How often the state file is written at most.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: Context,
        config: Config,
        once: bool,
        policies: Policies,
        state: DaemonState,
        metrics: Arc<Metrics>,
        notifier: Notifier,
        tick: Duration,
        rejected: usize,
    ) -> Scheduler {
        let queue = Queue::new(
            u64::from_le_bytes(crate::util::random_bytes::<8>()),
            config.daemon.jitter,
            once,
        );
        let mut s = Scheduler {
            ctx,
            config,
            once,
            policies: Policies::new(),
            queue,
            clock: Arc::new(SystemClock),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            state,
            metrics,
            notifier,
            unsupported_logged: HashSet::new(),
            summary: Summary {
                policies_rejected: rejected,
                ..Default::default()
            },
            tick,
            last_flush: Instant::now(),
            stopping: false,
            started: Instant::now(),
            runs_total: 0,
            report: None,
            report_task: None,
        };
        let now = s.clock.now();
        if let Some(schedule) = &s.config.report.schedule {
            let last = s.state.data.report.as_ref().and_then(|r| r.last_slot);
            s.report = Some(ReportTimer::new(schedule, last, now, once));
        }
        for (tenant, policy) in &policies {
            if let Some(rec) = s.state.data.tenants.get(tenant)
                && let Some(keys) = &rec.keys
            {
                s.metrics.set_keys(tenant, keys);
            }
            for job in ScheduledJob::ALL {
                if let Some(when) = job.when(policy) {
                    if let Some(rec) = s.state.job(tenant, job) {
                        s.metrics.restore(tenant, job, rec);
                    }
                    s.add_entry(tenant.clone(), job, when, Replan::CatchUp, now);
                }
            }
        }
        s.policies = policies;
        s.metrics.set_tenants(s.policies.len());
        s
    }

    /// Jobs scheduled (a tenant and job kind with a schedule).
    pub fn scheduled(&self) -> usize {
        self.queue.len()
    }

    /// Job kinds scheduled by some policy that this build cannot run.
    pub fn unsupported_kinds(&self) -> Vec<&'static str> {
        let kinds: BTreeSet<ScheduledJob> = self
            .queue
            .schedules()
            .map(|((_, j), _)| *j)
            .filter(|j| registry::launcher(*j).is_none())
            .collect();
        kinds.into_iter().map(|k| k.as_str()).collect()
    }

    fn add_entry(
        &mut self,
        tenant: TenantId,
        job: ScheduledJob,
        when: plan::When,
        mode: Replan,
        now: DateTime<Utc>,
    ) {
        let last = self.state.job(&tenant, job).and_then(|r| r.last_slot);
        let key = (tenant, job);
        self.queue.insert(key.clone(), when, last, mode, now);
        self.announce(&key);
    }

    fn remove_entry(&mut self, key: &Key) {
        self.queue.remove(key);
        self.metrics.remove_job(&key.0, key.1);
    }

    /// Exports the entry's planned start.
    fn announce(&self, key: &Key) {
        if !self.once {
            self.metrics
                .set_next(&key.0, key.1, self.queue.start_at(key));
        }
    }

    /// Starts ready jobs while there is room: one writer per tenant (readers
    /// beside it), `max_concurrent_jobs` in all.
    fn dispatch(&mut self) {
        // A job decided without running (an unsupported kind) frees its
        // tenant at once: go round again while that happens.
        while self.dispatch_pass() {}
        self.metrics.set_running(self.running.len());
    }

    /// One pass over the ready set; true if a started job ended within it.
    fn dispatch_pass(&mut self) -> bool {
        let max = self.config.daemon.max_concurrent_jobs.max(1);
        let running: HashSet<Key> = self.running.keys().cloned().collect();
        let state = &self.state;
        let chosen = self
            .queue
            .choose(self.clock.now(), &running, max, |tenant| {
                backed_up(state, tenant)
            });
        let mut freed = false;
        for key in chosen {
            self.start(key.clone());
            freed |= !self.running.contains_key(&key);
        }
        freed
    }

    fn start(&mut self, key: Key) {
        let Some(start) = self.queue.begin(&key, self.clock.now()) else {
            return;
        };
        let (slot, generation) = (start.slot, start.generation);
        let Some(policy) = self.policies.get(&key.0).cloned() else {
            return;
        };
        let Some(launch) = registry::launcher(key.1) else {
            self.unsupported(&key, slot, generation);
            return;
        };
        let fut = launch(Request {
            ctx: self.ctx.clone(),
            policy,
            job: key.1,
            slot,
        });
        let (tenant, job) = key.clone();
        let abort = self
            .tasks
            .spawn(async move { (tenant, job, slot, generation, fut.await) });
        self.task_keys.insert(abort.id(), (key.clone(), slot));
        self.metrics.set_next(&key.0, key.1, None);
        self.running.insert(
            key.clone(),
            Running {
                job: key.1,
                slot,
                generation,
                since: Instant::now(),
                abort,
            },
        );
    }

    /// A job kind this build cannot run: logged once, counted as failed each slot.
    fn unsupported(&mut self, key: &Key, slot: DateTime<Utc>, generation: u64) {
        let (tenant, job) = key;
        let file = self
            .policies
            .get(tenant)
            .map(|p| p.file.display().to_string())
            .unwrap_or_default();
        let message = format!("{job} jobs are not available in this build of custos");
        if self.unsupported_logged.insert(key.clone()) {
            tracing::error!(
                event = "job.unsupported",
                tenant = %tenant,
                job = %job,
                policy = %file,
                error_kind = ErrorKind::UnsupportedJob.as_str(),
                "{tenant}: {file} schedules {job}, but {message}; every due slot counts as a failed run"
            );
        }
        let now = self.clock.now();
        self.metrics.set_unsupported(tenant, *job);
        self.metrics
            .outcome(tenant, *job, RunOutcome::Unsupported, now);
        let rec = self.state.job_mut(tenant, *job);
        rec.last_slot = Some(slot);
        rec.last_started = Some(now);
        rec.last_finished = Some(now);
        rec.last_outcome = Some(RunOutcome::Unsupported);
        self.record(RunRecord {
            tenant: tenant.clone(),
            job: *job,
            slot,
            outcome: RunOutcome::Unsupported,
            started_at: None,
            duration_ms: None,
            error_kind: Some(ErrorKind::UnsupportedJob.into()),
            detail: message,
        });
        self.after_run(key, slot, generation);
    }

    /// Plans the slot after one that ran (unless a reload re-planned the job meanwhile).
    fn after_run(&mut self, key: &Key, slot: DateTime<Utc>, generation: u64) {
        let now = self.clock.now();
        self.queue
            .after_run(key, slot, generation, self.stopping, now);
        self.announce(key);
    }

    fn completed(&mut self, res: Result<(tokio::task::Id, TaskOutput), JoinError>) {
        match res {
            Ok((id, (tenant, job, slot, generation, launched))) => {
                self.task_keys.remove(&id);
                self.running.remove(&(tenant.clone(), job));
                self.finish((tenant, job), slot, generation, launched);
            }
            Err(e) => {
                let Some(((tenant, job), slot)) = self.task_keys.remove(&e.id()) else {
                    return;
                };
                let generation = self
                    .running
                    .remove(&(tenant.clone(), job))
                    .map(|r| r.generation)
                    .unwrap_or(0);
                if e.is_cancelled() {
                    return;
                }
                tracing::error!(
                    event = "job.panicked",
                    tenant = %tenant,
                    job = %job,
                    error_kind = ErrorKind::Internal.as_str(),
                    "{job} of {tenant} panicked: {e}"
                );
                let now = self.clock.now();
                self.metrics.outcome(&tenant, job, RunOutcome::Failure, now);
                let rec = self.state.job_mut(&tenant, job);
                rec.last_slot = Some(slot);
                rec.last_outcome = Some(RunOutcome::Failure);
                rec.last_finished = Some(now);
                self.record(RunRecord {
                    tenant: tenant.clone(),
                    job,
                    slot,
                    outcome: RunOutcome::Failure,
                    started_at: None,
                    duration_ms: None,
                    error_kind: Some(ErrorKind::Internal.into()),
                    detail: format!("panicked: {e}"),
                });
                self.after_run(&(tenant, job), slot, generation);
            }
        }
        self.metrics.set_running(self.running.len());
    }

    fn finish(&mut self, key: Key, slot: DateTime<Utc>, generation: u64, launched: Launched) {
        let (tenant, job) = &key;
        match launched {
            Launched::Ran { report, keys } => {
                let success = report.outcome == Outcome::Success;
                let outcome = if success {
                    RunOutcome::Success
                } else {
                    RunOutcome::Failure
                };
                let rec = self.state.job_mut(tenant, *job);
                rec.last_slot = Some(slot);
                rec.last_started = Some(report.started_at);
                rec.last_finished = Some(report.finished_at);
                rec.last_outcome = Some(outcome);
                rec.last_duration_ms = Some(report.duration_ms);
                if success {
                    rec.last_success = Some(report.finished_at);
                }
                if let Some(k) = keys {
                    self.metrics.set_keys(tenant, &k);
                    self.state.set_keys(tenant, k);
                }
                self.metrics.report(*job, &report);
                self.record(record_of(*job, slot, &report));
                self.after_run(&key, slot, generation);
            }
            Launched::Declined {
                reason,
                mark,
                ask_again,
            } => {
                tracing::info!(
                    event = "job.skipped",
                    tenant = %tenant,
                    job = %job,
                    slot = %slot.to_rfc3339(),
                    reason = %reason,
                    "{job} of {tenant} skipped: {reason}"
                );
                let done = mark.as_ref().map_or(slot, |m| m.slot.max(slot));
                let success_at = mark
                    .as_ref()
                    .filter(|m| m.outcome == super::slots::MarkOutcome::Success)
                    .map(|m| m.finished_at);
                let rec = self.state.job_mut(tenant, *job);
                if !ask_again {
                    rec.last_slot = Some(done);
                }
                if let Some(t) = success_at {
                    rec.last_success = rec.last_success.max(Some(t));
                }
                self.metrics.done_elsewhere(tenant, *job, success_at);
                self.record(RunRecord {
                    tenant: tenant.clone(),
                    job: *job,
                    slot,
                    outcome: RunOutcome::Skipped,
                    started_at: None,
                    duration_ms: None,
                    error_kind: None,
                    detail: reason,
                });
                self.after_run(&key, done, generation);
            }
            Launched::Contended(e) => self.contended(&key, slot, generation, e),
        }
    }

    fn contended(&mut self, key: &Key, slot: DateTime<Utc>, generation: u64, e: Error) {
        let (tenant, job) = key;
        self.metrics.contended(tenant, *job);
        let (holder, expires) = match &e {
            Error::LeaseContended {
                holder, expires, ..
            } => (holder.clone(), expires.clone()),
            other => (other.to_string(), String::new()),
        };
        let once_limit = self.config.daemon.lease_ttl + Duration::from_secs(30);
        let Some(contention) = self.queue.contended(key, generation, Instant::now()) else {
            return;
        };
        // 1 s, 2 s, 4 s … up to a minute, with up to 50 % jitter.
        let base =
            Duration::from_secs(1 << contention.attempt.min(6).saturating_sub(1)).min(MAX_RETRY);
        let delay = base + base.mul_f64(rand::random_range(0.0..0.5));
        if self.stopping && !self.once {
            // Shutting down: the slot runs after the next start.
            self.queue.drop_pending(key);
            return;
        }
        let give_up = self.stopping || (self.once && contention.since.elapsed() >= once_limit);
        tracing::info!(
            event = "lease.contended",
            tenant = %tenant,
            job = %job,
            slot = %slot.to_rfc3339(),
            holder = %holder,
            expires = %expires,
            attempt = contention.attempt,
            retry_in_ms = (!give_up).then_some(delay.as_millis() as u64),
            "{job} of {tenant} waits: the tenant's lease is held by {holder}"
        );
        if give_up {
            self.queue.drop_pending(key);
            let now = self.clock.now();
            self.metrics
                .outcome(tenant, *job, RunOutcome::Contended, now);
            self.record(RunRecord {
                tenant: tenant.clone(),
                job: *job,
                slot,
                outcome: RunOutcome::Contended,
                started_at: None,
                duration_ms: None,
                error_kind: Some(e.kind().into()),
                detail: e.to_string(),
            });
            return;
        }
        self.queue.retry(key, delay, self.clock.now());
        self.announce(key);
    }

    /// SIGHUP: reloads the policies (see [`policies`]) and re-plans what changed.
    fn reload(&mut self) {
        self.notifier.reloading();
        let loaded = policies::load(
            &self.config.policies_dir,
            &self.policies,
            &self.config.residency_rules(),
        );
        self.metrics.policy_rejected(loaded.rejected.len());
        self.summary.policies_rejected += loaded.rejected.len();
        let outcome = if loaded.refused_whole {
            "failed"
        } else if loaded.rejected.is_empty() {
            "applied"
        } else {
            "partial"
        };
        self.metrics.reloaded(outcome);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        for tenant in self.policies.keys() {
            if !loaded.policies.contains_key(tenant) {
                removed.push(tenant.clone());
            }
        }
        for (tenant, policy) in &loaded.policies {
            match self.policies.get(tenant) {
                None => added.push(tenant.clone()),
                Some(old) if !Arc::ptr_eq(old, policy) && **old != **policy => {
                    changed.push(tenant.clone())
                }
                Some(_) => {}
            }
        }
        for tenant in &removed {
            for job in ScheduledJob::ALL {
                self.queue.remove(&(tenant.clone(), job));
            }
            self.metrics.remove_tenant(tenant);
        }
        let now = self.clock.now();
        for tenant in added.iter().chain(&changed) {
            let policy = loaded.policies[tenant].clone();
            for job in ScheduledJob::ALL {
                let key = (tenant.clone(), job);
                let new = job.when(&policy);
                let old = self.queue.when(&key).cloned();
                match (old, new) {
                    (None, None) => {}
                    (Some(_), None) => self.remove_entry(&key),
                    (None, Some(when)) => {
                        self.add_entry(tenant.clone(), job, when, Replan::CatchUp, now)
                    }
                    (Some(old), Some(when)) if old == when => {}
                    (Some(_), Some(when)) => {
                        self.add_entry(tenant.clone(), job, when, Replan::Changed, now)
                    }
                }
            }
        }
        self.policies = loaded.policies;
        self.metrics.set_tenants(self.policies.len());
        let names = |v: &[TenantId]| {
            v.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        tracing::info!(
            event = "policy.reloaded",
            outcome,
            tenants = self.policies.len(),
            added = %names(&added),
            removed = %names(&removed),
            changed = %names(&changed),
            kept_previous = %names(&loaded.kept),
            rejected = loaded.rejected.len(),
            "policies reloaded ({outcome}): {} added, {} removed, {} changed, {} problem(s) refused",
            added.len(),
            removed.len(),
            changed.len(),
            loaded.rejected.len()
        );
        // Policy changes go to the audit log too (in the background: reload
        // runs inside the scheduler loop, which must not wait on disk).
        let ctx = self.ctx.clone();
        let records: Vec<(TenantId, &'static str)> = added
            .iter()
            .map(|t| (t.clone(), "added"))
            .chain(removed.iter().map(|t| (t.clone(), "removed")))
            .chain(changed.iter().map(|t| (t.clone(), "changed")))
            .collect();
        if !records.is_empty() {
            tokio::spawn(async move {
                for (tenant, change) in records {
                    let details = serde_json::json!({ "change": change });
                    if let Err(e) = ctx.record("policy.change", Some(&tenant), details).await {
                        tracing::error!(event = "audit.failed", tenant = %tenant, error = %e, "could not record a policy change");
                    }
                }
            });
        }
        let status = self.status_line();
        self.notifier.ready(&status);
    }

    fn status_line(&mut self) -> String {
        let mut running: Vec<String> = self
            .running
            .iter()
            .map(|((t, _), r)| format!("{t}/{} ({}s)", r.job, r.since.elapsed().as_secs()))
            .collect();
        running.sort();
        let shown = running.len().min(5);
        let mut s = format!(
            "{} tenants, {} jobs scheduled; running {}",
            self.policies.len(),
            self.queue.len(),
            running.len()
        );
        if shown > 0 {
            s.push_str(": ");
            s.push_str(&running[..shown].join(", "));
            if running.len() > shown {
                s.push_str(", …");
            }
        }
        if self.queue.waiting() > 0 {
            s.push_str(&format!("; {} waiting", self.queue.waiting()));
        }
        if let Some((at, (tenant, job))) = self.queue.next_timer() {
            s.push_str(&format!(
                "; next: {tenant}/{job} at {}",
                at.format("%Y-%m-%dT%H:%M:%SZ")
            ));
        }
        s
    }

    /// Once per loop: health tick, watchdog, state file, status.
    fn heartbeat(&mut self) {
        self.metrics.tick();
        self.notifier.watchdog_ping();
        if self.state.is_dirty() && (self.last_flush.elapsed() >= FLUSH_EVERY || self.stopping) {
            self.flush();
        }
        // While stopping, the status stays "stopping: waiting for N job(s)".
        if !self.stopping {
            let status = self.status_line();
            self.notifier.status(&status);
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.state.flush() {
            tracing::error!(event = "daemon.state_write_failed", error = %e, "could not write the schedule state");
        }
        self.last_flush = Instant::now();
    }

    /// Counts a run; `--once` keeps it for its report (a long-running
    /// daemon keeps only the count: its runs are in the job reports).
    fn record(&mut self, run: RunRecord) {
        self.runs_total += 1;
        if self.once {
            self.summary.runs.push(run);
        }
    }

    fn idle(&self) -> bool {
        self.tasks.is_empty() && self.queue.idle() && self.report_task.is_none()
    }

    /// Starts the compliance report when its slot is due (one at a time).
    fn start_report(&mut self) {
        let now = self.clock.now();
        if self.stopping || self.report_task.is_some() {
            return;
        }
        let Some(timer) = &mut self.report else {
            return;
        };
        let Some(slot) = timer.due(now) else {
            return;
        };
        timer.started();
        let run = reporting::run(self.config.clone(), self.ctx.clone(), slot);
        self.report_task = Some((slot, tokio::spawn(run)));
    }

    fn report_done(&mut self, slot: DateTime<Utc>, res: Result<ReportRun, JoinError>) {
        self.report_task = None;
        let run = res.unwrap_or_else(|e| reporting::lost(slot, &e));
        let now = self.clock.now();
        let rec = self.state.report_mut();
        rec.last_slot = Some(slot);
        rec.last_outcome = Some(run.outcome);
        rec.last_files = run.files.clone();
        if let Some(timer) = &mut self.report {
            timer.ran(slot, now);
        }
        if self.once {
            self.summary.report = Some(run);
        }
    }

    /// The loop; returns when a signal stops it (or, `--once`, when nothing
    /// is left to run).
    pub async fn run(mut self, signals: &mut Signals) -> Summary {
        // READY=1 once the policies are loaded and the jobs planned.
        let status = self.status_line();
        self.notifier.ready(&status);
        let stop = loop {
            let now = self.clock.now();
            self.queue.fire(now);
            self.dispatch();
            self.start_report();
            self.heartbeat();
            if self.once && self.idle() {
                break None;
            }
            let mut wake = self.tick;
            if let Some((at, _)) = self.queue.next_timer() {
                wake = wake.min((at - self.clock.now()).to_std().unwrap_or(Duration::ZERO));
            }
            if let Some(at) = self.report.as_ref().and_then(ReportTimer::next_at) {
                wake = wake.min((at - self.clock.now()).to_std().unwrap_or(Duration::ZERO));
            }
            if self.state.is_dirty() {
                wake = wake.min(FLUSH_EVERY.saturating_sub(self.last_flush.elapsed()));
            }
            tokio::select! {
                biased;
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.completed(res),
                (slot, res) = reporting::finished(&mut self.report_task), if self.report_task.is_some() => self.report_done(slot, res),
                _ = signals.term.recv() => break Some("SIGTERM"),
                _ = signals.int.recv() => break Some("SIGINT"),
                _ = signals.hup.recv() => {
                    if self.once {
                        tracing::info!(event = "policy.reload_ignored", "SIGHUP ignored: --once runs what was due at start");
                    } else {
                        self.reload();
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
        };
        if let Some(signal) = stop {
            self.shutdown(signals, signal).await;
        } else {
            self.flush();
        }
        if self.once && self.summary.runs.is_empty() && self.summary.report.is_none() {
            self.once = false;
            let now = self.clock.now();
            let mut next: Option<(DateTime<Utc>, Key)> = None;
            for (key, when) in self.queue.schedules() {
                let last = self.state.job(&key.0, key.1).and_then(|r| r.last_slot);
                if let Some(n) = plan::next_slot(when, last, now)
                    && next.as_ref().is_none_or(|(t, _)| n.slot < *t)
                {
                    next = Some((n.slot, key.clone()));
                }
            }
            self.summary.next = next.map(|(t, (tenant, job))| {
                format!("{tenant}/{job} at {}", t.format("%Y-%m-%dT%H:%M:%SZ"))
            });
        }
        self.summary.tenants = self.policies.len();
        self.summary
    }

    /// Stops starting jobs, gives running ones `shutdown_timeout`, then abandons them.
    async fn shutdown(&mut self, signals: &mut Signals, signal: &str) {
        self.stopping = true;
        self.queue.stop();
        let timeout = self.config.daemon.shutdown_timeout;
        let running = self.running.len();
        tracing::info!(
            event = "daemon.stopping",
            signal,
            running,
            timeout_s = timeout.as_secs(),
            "{signal}: no new jobs; waiting up to {}s for {running} running job(s)",
            timeout.as_secs()
        );
        self.notifier
            .stopping(&format!("stopping: waiting for {running} job(s)"));
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.tasks.is_empty() {
            tokio::select! {
                biased;
                Some(res) = self.tasks.join_next_with_id() => self.completed(res),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = signals.term.recv() => {
                    tracing::warn!(event = "daemon.stopping", signal = "SIGTERM", "second signal: abandoning running jobs now");
                    break;
                }
                _ = signals.int.recv() => {
                    tracing::warn!(event = "daemon.stopping", signal = "SIGINT", "second signal: abandoning running jobs now");
                    break;
                }
                _ = tokio::time::sleep(self.tick) => self.heartbeat(),
            }
        }
        let lease_ttl = self.config.daemon.lease_ttl.as_secs();
        let abandoned: Vec<(TenantId, Running)> =
            self.running.drain().map(|((t, _), r)| (t, r)).collect();
        for (tenant, r) in &abandoned {
            tracing::warn!(
                event = "job.abandoned",
                tenant = %tenant,
                job = %r.job,
                slot = %r.slot.to_rfc3339(),
                running_ms = r.since.elapsed().as_millis() as u64,
                lease_ttl_s = lease_ttl,
                "{} of {tenant} abandoned at the shutdown timeout: nothing it wrote is referenced yet; \
                 its lease expires at most {lease_ttl}s after the daemon exits and its slot runs again at the next start",
                r.job
            );
            r.abort.abort();
            // The aborted task never returns: this is its error.
            let cancelled = Error::Cancelled {
                what: format!("{} of {tenant}", r.job),
                reason: "still running at the shutdown timeout".into(),
            };
            self.metrics
                .outcome(tenant, r.job, RunOutcome::Abandoned, self.clock.now());
            self.record(RunRecord {
                tenant: tenant.clone(),
                job: r.job,
                slot: r.slot,
                outcome: RunOutcome::Abandoned,
                started_at: None,
                duration_ms: Some(r.since.elapsed().as_millis() as u64),
                error_kind: Some(cancelled.kind().into()),
                detail: cancelled.to_string(),
            });
        }
        self.summary.abandoned = abandoned.len();
        // A report writes its files atomically: stopping it leaves none half-written.
        if let Some((slot, handle)) = self.report_task.take() {
            handle.abort();
            tracing::warn!(event = "report.abandoned", slot = %slot.to_rfc3339(), "compliance report abandoned at shutdown; its slot runs again at the next start");
        }
        // Aborted tasks unwind at their next await: their lease guards stop
        // renewing (the lease expires) and their unwrapped keys are dropped.
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        self.flush();
        tracing::info!(
            event = "daemon.stopped",
            runs = self.runs_total,
            abandoned = self.summary.abandoned,
            uptime_s = self.started.elapsed().as_secs(),
            "daemon stopped"
        );
    }
}

/// The `--once` report line of a job that ran.
fn record_of(job: ScheduledJob, slot: DateTime<Utc>, r: &JobReport) -> RunRecord {
    let success = r.outcome == Outcome::Success;
    let detail = if success {
        summarize(r)
    } else {
        r.error.clone().unwrap_or_default()
    };
    RunRecord {
        tenant: r.tenant.clone(),
        job,
        slot,
        outcome: if success {
            RunOutcome::Success
        } else {
            RunOutcome::Failure
        },
        started_at: Some(r.started_at),
        duration_ms: Some(r.duration_ms),
        error_kind: r.error_kind.map(str::to_owned),
        detail,
    }
}

fn summarize(r: &JobReport) -> String {
    let m = &r.metrics;
    let mut parts = Vec::new();
    if let Some(s) = &m.snapshot {
        parts.push(format!("snapshot {}", &s[..s.len().min(8)]));
    }
    if let Some(f) = m.files {
        parts.push(format!("{f} files"));
    }
    if let Some(b) = m.bytes_in.filter(|b| *b > 0) {
        parts.push(format!("{} in", crate::util::human_bytes(b)));
    }
    if let Some(b) = m.bytes_stored.filter(|b| *b > 0) {
        parts.push(format!("{} stored", crate::util::human_bytes(b)));
    }
    if let Some(rd) = r.result.get("scheduled").and_then(|s| s.get("read_data"))
        && let (Some(n), Some(of)) = (rd.get("n"), rd.get("of"))
    {
        parts.push(format!("read-data slice {n}/{of}"));
    }
    for (k, v) in &m.gauges {
        parts.push(format!("{k} {v}"));
    }
    parts.join(", ")
}

/// Whether a backup of `tenant` has succeeded (by this daemon's state).
fn backed_up(state: &DaemonState, tenant: &TenantId) -> bool {
    state
        .job(tenant, ScheduledJob::Backup)
        .is_some_and(|r| r.last_success.is_some())
}

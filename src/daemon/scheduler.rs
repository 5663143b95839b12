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

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::{AbortHandle, JoinError, JoinSet};

use super::metrics::Metrics;
use super::notify::Notifier;
use super::plan::{self, Next, When};
use super::policies::{self, Policies};
use super::registry::{self, Launched, Request, ScheduledJob};
use super::state::{DaemonState, RunOutcome};
use crate::config::Config;
use crate::context::Context;
use crate::error::{Error, ErrorKind};
use crate::report::{JobReport, Outcome};
use crate::tenant::TenantId;

type Key = (TenantId, ScheduledJob);

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
}

impl Summary {
    /// True when a run failed or a policy was refused.
    pub fn failed(&self) -> bool {
        self.policies_rejected > 0 || self.runs.iter().any(|r| r.outcome.is_failure())
    }

    pub fn count(&self, outcome: RunOutcome) -> usize {
        self.runs.iter().filter(|r| r.outcome == outcome).count()
    }
}

struct Entry {
    when: When,
    /// Bumped on every (re)planning; timers and ready items of an older
    /// generation are stale and ignored.
    generation: u64,
    pending: Option<Pending>,
    /// Consecutive busy-lease retries of the pending slot.
    contended: u32,
    first_contended: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: DateTime<Utc>,
    generation: u64,
    key: Key,
}

/// Due and waiting for a free tenant and a free job slot; ordered by start
/// time, then job priority.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ready {
    at: DateTime<Utc>,
    job: ScheduledJob,
    tenant: TenantId,
    generation: u64,
}

struct Running {
    job: ScheduledJob,
    slot: DateTime<Utc>,
    generation: u64,
    since: Instant,
    abort: AbortHandle,
}

type TaskOutput = (TenantId, ScheduledJob, DateTime<Utc>, u64, Launched);

enum Plan {
    /// Catch up on missed slots (start, new tenants, after each run).
    Normal,
    /// A reload changed the schedule: no catch-up.
    Changed,
}

pub struct Scheduler {
    ctx: Context,
    config: Config,
    once: bool,
    policies: Policies,
    entries: HashMap<Key, Entry>,
    timers: BinaryHeap<Reverse<Timer>>,
    ready: BTreeSet<Ready>,
    running: HashMap<Key, Running>,
    /// Tenants whose lease was busy: none of their writers starts before
    /// this time (they would find the same lease busy).
    backoff: HashMap<TenantId, DateTime<Utc>>,
    tasks: JoinSet<TaskOutput>,
    task_keys: HashMap<tokio::task::Id, (Key, DateTime<Utc>)>,
    state: DaemonState,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    seed: u64,
    next_gen: u64,
    unsupported_logged: HashSet<Key>,
    summary: Summary,
    tick: Duration,
    last_flush: Instant,
    stopping: bool,
    started: Instant,
    runs_total: u64,
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
        let mut s = Scheduler {
            ctx,
            config,
            once,
            policies: Policies::new(),
            entries: HashMap::new(),
            timers: BinaryHeap::new(),
            ready: BTreeSet::new(),
            running: HashMap::new(),
            backoff: HashMap::new(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            state,
            metrics,
            notifier,
            seed: u64::from_le_bytes(crate::util::random_bytes::<8>()),
            next_gen: 1,
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
        };
        let now = Self::now();
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
                    s.add_entry(tenant.clone(), job, when, Plan::Normal, now);
                }
            }
        }
        s.policies = policies;
        s.metrics.set_tenants(s.policies.len());
        s
    }

    /// Jobs scheduled (a tenant and job kind with a schedule).
    pub fn scheduled(&self) -> usize {
        self.entries.len()
    }

    /// Job kinds scheduled by some policy that this build cannot run.
    pub fn unsupported_kinds(&self) -> Vec<&'static str> {
        let kinds: BTreeSet<ScheduledJob> = self
            .entries
            .keys()
            .map(|(_, j)| *j)
            .filter(|j| registry::launcher(*j).is_none())
            .collect();
        kinds.into_iter().map(|k| k.as_str()).collect()
    }

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn bump(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn add_entry(
        &mut self,
        tenant: TenantId,
        job: ScheduledJob,
        when: When,
        mode: Plan,
        now: DateTime<Utc>,
    ) {
        let last = self.state.job(&tenant, job).and_then(|r| r.last_slot);
        let next = match mode {
            Plan::Normal => plan::next_slot(&when, last, now),
            Plan::Changed => plan::next_slot_after_change(&when, last, now),
        };
        let key = (tenant, job);
        self.entries.insert(
            key.clone(),
            Entry {
                when,
                generation: 0,
                pending: None,
                contended: 0,
                first_contended: None,
            },
        );
        self.plan(&key, next, now);
    }

    fn remove_entry(&mut self, key: &Key) {
        self.entries.remove(key);
        self.metrics.remove_job(&key.0, key.1);
    }

    /// Sets the entry's next slot and its start (slot + jitter; now + jitter
    /// for a catch-up). `--once` starts due slots at once and plans nothing later.
    /// `now` is shared by the jobs of a tenant planned together, so those
    /// due at once keep their priority order.
    fn plan(&mut self, key: &Key, next: Option<Next>, now: DateTime<Utc>) {
        let generation = self.bump();
        let jitter_max = self.config.daemon.jitter;
        let once = self.once;
        let seed = self.seed;
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.generation = generation;
        entry.contended = 0;
        entry.first_contended = None;
        let Some(next) = next else {
            entry.pending = None;
            self.metrics.set_next(&key.0, key.1, None);
            return;
        };
        if once {
            if next.slot <= now {
                entry.pending = Some(Pending { slot: next.slot });
                self.ready.insert(Ready {
                    at: now,
                    job: key.1,
                    tenant: key.0.clone(),
                    generation,
                });
            } else {
                entry.pending = None;
            }
            return;
        }
        let period = entry.when.period_after(next.slot);
        let jitter = plan::jitter(seed, &key.0, next.slot, jitter_max, period);
        let base = if next.catch_up { now } else { next.slot };
        // Checked: a slot near the end of chrono's range (a far-future shred
        // date) must not panic the scheduler; the jitter is dropped there.
        let at = chrono::Duration::from_std(jitter)
            .ok()
            .and_then(|j| base.checked_add_signed(j))
            .unwrap_or(base);
        entry.pending = Some(Pending { slot: next.slot });
        self.timers.push(Reverse(Timer {
            at,
            generation,
            key: key.clone(),
        }));
        self.metrics.set_next(&key.0, key.1, Some(at));
    }

    /// Tries the pending slot again later (busy lease).
    fn retry(&mut self, key: &Key, delay: Duration) {
        let generation = self.bump();
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.generation = generation;
        let at = Self::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        self.backoff.insert(key.0.clone(), at);
        self.timers.push(Reverse(Timer {
            at,
            generation,
            key: key.clone(),
        }));
        self.metrics.set_next(&key.0, key.1, Some(at));
    }

    fn is_current(&self, key: &Key, generation: u64) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.generation == generation && e.pending.is_some())
    }

    /// Moves timers that are due to the ready set.
    fn fire_timers(&mut self, now: DateTime<Utc>) {
        while let Some(Reverse(top)) = self.timers.peek() {
            if top.at > now {
                break;
            }
            let Reverse(t) = self.timers.pop().expect("peeked");
            if self.is_current(&t.key, t.generation) {
                self.ready.insert(Ready {
                    at: t.at,
                    job: t.key.1,
                    tenant: t.key.0,
                    generation: t.generation,
                });
            }
        }
    }

    /// The next live timer, dropping stale ones on the way.
    fn next_timer(&mut self) -> Option<Timer> {
        while let Some(Reverse(top)) = self.timers.peek() {
            if self.is_current(&top.key, top.generation) {
                return Some(top.clone());
            }
            self.timers.pop();
        }
        None
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
        if self.running.len() >= max || self.ready.is_empty() {
            return false;
        }
        let now = Self::now();
        self.backoff.retain(|_, until| *until > now);
        let mut chosen = Vec::new();
        // Tenants with a writer running or chosen: writers exclude writers.
        let mut writing: HashSet<TenantId> = self
            .running
            .iter()
            .filter(|(_, r)| !r.job.is_reader())
            .map(|((t, _), _)| t.clone())
            .collect();
        // Tenants with a writer running, or ready ahead of the job looked at.
        let mut writer_ahead = writing.clone();
        let mut stale = Vec::new();
        for r in &self.ready {
            if self.running.len() + chosen.len() >= max {
                break;
            }
            let key = (r.tenant.clone(), r.job);
            if !self.is_current(&key, r.generation) {
                stale.push(r.clone());
                continue;
            }
            if self.running.contains_key(&key) {
                continue;
            }
            if r.job.is_reader() {
                // A tenant never backed up (as far as this daemon knows)
                // backs up before it is checked or drilled: a first start
                // would otherwise check a tenant that does not exist yet.
                if writer_ahead.contains(&r.tenant) && !self.backed_up(&r.tenant) {
                    continue;
                }
            } else {
                writer_ahead.insert(r.tenant.clone());
                // A writer waits for the tenant's other writer (here, or
                // elsewhere: a busy lease); readers never hold it up.
                if writing.contains(&r.tenant) || self.backoff.contains_key(&r.tenant) {
                    continue;
                }
                writing.insert(r.tenant.clone());
            }
            chosen.push(r.clone());
        }
        for r in stale {
            self.ready.remove(&r);
        }
        let mut freed = false;
        for r in chosen {
            self.ready.remove(&r);
            let key = (r.tenant, r.job);
            self.start(key.clone());
            freed |= !self.running.contains_key(&key);
        }
        freed
    }

    /// Whether a backup of `tenant` has succeeded (by this daemon's state).
    fn backed_up(&self, tenant: &TenantId) -> bool {
        self.state
            .job(tenant, ScheduledJob::Backup)
            .is_some_and(|r| r.last_success.is_some())
    }

    fn start(&mut self, key: Key) {
        let now = Self::now();
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let Some(pending) = entry.pending else {
            return;
        };
        // A run that waited past later slots (a busy lease, a full job limit)
        // runs once, for the latest of them.
        let slot = match &entry.when {
            When::Cron(_) | When::Every { .. } => entry
                .when
                .last_at_or_before(now)
                .map_or(pending.slot, |latest| latest.max(pending.slot)),
        };
        entry.pending = Some(Pending { slot });
        let generation = entry.generation;
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
        let now = Self::now();
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
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        if self.stopping || self.once {
            entry.pending = None;
            return;
        }
        let now = Self::now();
        let next = plan::next_slot(&entry.when, Some(slot), now);
        self.plan(key, next, now);
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
                let now = Self::now();
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
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        entry.contended += 1;
        let first = *entry.first_contended.get_or_insert_with(Instant::now);
        // 1 s, 2 s, 4 s … up to a minute, with up to 50 % jitter.
        let base =
            Duration::from_secs(1 << entry.contended.min(6).saturating_sub(1)).min(MAX_RETRY);
        let delay = base + base.mul_f64(rand::random_range(0.0..0.5));
        if self.stopping && !self.once {
            // Shutting down: the slot runs after the next start.
            entry.pending = None;
            return;
        }
        let give_up = self.stopping || (self.once && first.elapsed() >= once_limit);
        tracing::info!(
            event = "lease.contended",
            tenant = %tenant,
            job = %job,
            slot = %slot.to_rfc3339(),
            holder = %holder,
            expires = %expires,
            attempt = entry.contended,
            retry_in_ms = (!give_up).then_some(delay.as_millis() as u64),
            "{job} of {tenant} waits: the tenant's lease is held by {holder}"
        );
        if give_up {
            entry.pending = None;
            let now = Self::now();
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
        self.retry(key, delay);
    }

    /// SIGHUP: reloads the policies (see [`policies`]) and re-plans what changed.
    fn reload(&mut self) {
        self.notifier.reloading();
        let loaded = policies::load(&self.config.policies_dir, &self.policies);
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
                self.entries.remove(&(tenant.clone(), job));
            }
            self.metrics.remove_tenant(tenant);
        }
        let now = Self::now();
        for tenant in added.iter().chain(&changed) {
            let policy = loaded.policies[tenant].clone();
            for job in ScheduledJob::ALL {
                let key = (tenant.clone(), job);
                let new = job.when(&policy);
                let old = self.entries.get(&key).map(|e| e.when.clone());
                match (old, new) {
                    (None, None) => {}
                    (Some(_), None) => self.remove_entry(&key),
                    (None, Some(when)) => {
                        self.add_entry(tenant.clone(), job, when, Plan::Normal, now)
                    }
                    (Some(old), Some(when)) if old == when => {}
                    (Some(_), Some(when)) => {
                        self.add_entry(tenant.clone(), job, when, Plan::Changed, now)
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
            self.entries.len(),
            running.len()
        );
        if shown > 0 {
            s.push_str(": ");
            s.push_str(&running[..shown].join(", "));
            if running.len() > shown {
                s.push_str(", …");
            }
        }
        if !self.ready.is_empty() {
            s.push_str(&format!("; {} waiting", self.ready.len()));
        }
        if let Some(t) = self.next_timer() {
            s.push_str(&format!(
                "; next: {}/{} at {}",
                t.key.0,
                t.key.1,
                t.at.format("%Y-%m-%dT%H:%M:%SZ")
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
        self.tasks.is_empty()
            && self.ready.is_empty()
            && self.entries.values().all(|e| e.pending.is_none())
    }

    /// The loop; returns when a signal stops it (or, `--once`, when nothing
    /// is left to run).
    pub async fn run(mut self, signals: &mut Signals) -> Summary {
        // READY=1 once the policies are loaded and the jobs planned.
        let status = self.status_line();
        self.notifier.ready(&status);
        let stop = loop {
            let now = Self::now();
            self.fire_timers(now);
            self.dispatch();
            self.heartbeat();
            if self.once && self.idle() {
                break None;
            }
            let mut wake = self.tick;
            if let Some(t) = self.next_timer() {
                wake = wake.min((t.at - Self::now()).to_std().unwrap_or(Duration::ZERO));
            }
            if self.state.is_dirty() {
                wake = wake.min(FLUSH_EVERY.saturating_sub(self.last_flush.elapsed()));
            }
            tokio::select! {
                biased;
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.completed(res),
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
        if self.once && self.summary.runs.is_empty() {
            self.once = false;
            let now = Self::now();
            let mut next: Option<(DateTime<Utc>, Key)> = None;
            for (key, e) in &self.entries {
                let last = self.state.job(&key.0, key.1).and_then(|r| r.last_slot);
                if let Some(n) = plan::next_slot(&e.when, last, now)
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
        self.ready.clear();
        self.timers.clear();
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
                .outcome(tenant, r.job, RunOutcome::Abandoned, Self::now());
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

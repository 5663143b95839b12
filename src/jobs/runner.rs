//! Runs one job for one tenant the same way for the CLI and the daemon: open
//! (or initialise) the repository, take the tenant lease (writers) or
//! register a reader record (readers, see [`JobAccess`]), run, release, and
//! report: `job.started` / `job.finished` events, a JSON job report, and the
//! audit log (`<job>` records; `<job>.begin` / `<job>.end` around jobs that
//! destroy data or keys).

use std::time::Instant;

use chrono::Utc;
use futures::future::BoxFuture;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::keys::KeyRef;
use crate::repo::{PolicyUse, Repo};
use crate::report::{self, JobKind, JobOutput, JobReport, Outcome};
use crate::store::lease::LeaseGuard;
use crate::store::readers::ReaderGuard;
use crate::tenant::TenantId;

/// How a job holds its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAccess {
    /// Reads only (restore, drill, check): registers a reader record, takes
    /// no lease, never waits for a writer and is never waited for by one,
    /// except by a deleter (which leaves what it may still read in place).
    Reader,
    /// Changes the repository (backup, rotate, forget, prune, shred): takes
    /// the tenant's exclusive lease; writers exclude each other.
    Writer,
}

impl JobAccess {
    pub fn of(job: JobKind) -> JobAccess {
        match job {
            JobKind::Restore | JobKind::Check | JobKind::Drill => JobAccess::Reader,
            JobKind::Init
            | JobKind::Backup
            | JobKind::Forget
            | JobKind::Prune
            | JobKind::Rotate
            | JobKind::Shred => JobAccess::Writer,
        }
    }
}

/// What the job does with the tenant's key: readers and shred tolerate a
/// policy that still names the key the tenant moved away from; every job that
/// may protect something new under the key does not.
fn policy_use(job: JobKind) -> PolicyUse {
    match job {
        JobKind::Restore | JobKind::Check | JobKind::Drill | JobKind::Shred => PolicyUse::ReadsOnly,
        JobKind::Init | JobKind::Backup | JobKind::Forget | JobKind::Prune | JobKind::Rotate => {
            PolicyUse::Writes
        }
    }
}

/// Jobs whose view leaves out what pending deletions name: readers (they
/// must never read what a deleter may remove under them) and backup (it
/// must never deduplicate against it). Deleters see everything.
fn hides_pending_deletions(job: JobKind) -> bool {
    matches!(
        job,
        JobKind::Restore | JobKind::Check | JobKind::Drill | JobKind::Backup
    )
}

pub struct JobSpec<'a> {
    pub tenant: &'a TenantId,
    pub job: JobKind,
    /// The key the tenant's policy names, if there is a policy.
    pub policy_key: Option<&'a KeyRef>,
    /// Initialise the tenant with this key if it is not yet (first backup).
    pub init_with: Option<&'a KeyRef>,
}

/// What a job run produced: its report and, on success, its result.
pub struct JobRun<T> {
    pub report: JobReport,
    pub result: Result<T>,
}

/// Lets the job's future borrow from the caller: `&'r &'a ()` implies `'a: 'r`.
pub type Borrows<'r, 'a> = std::marker::PhantomData<&'r &'a ()>;

pub async fn run_job<'a, T, F>(ctx: &Context, spec: JobSpec<'_>, f: F) -> JobRun<T>
where
    T: JobOutput,
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let started_at = Utc::now();
    let clock = Instant::now();
    report::job_started(spec.tenant, spec.job);
    let result = run_inner(ctx, &spec, f).await;
    finish(ctx, &spec, started_at, clock, result).await
}

async fn run_inner<'a, T, F>(ctx: &Context, spec: &JobSpec<'_>, f: F) -> Result<T>
where
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let mut repo = open_repo(ctx, spec).await?;
    let lease = acquire(ctx, spec, &mut repo).await?;
    let result = match begin(ctx, spec).await {
        Ok(()) => f(&repo, &lease, std::marker::PhantomData).await,
        Err(e) => Err(e),
    };
    let result = settle_reader(spec, &repo, &lease, result).await;
    lease.release().await;
    repo.forget_keys().await;
    result
}

/// Runs `f` as a reader outside the job machinery (no job report, no audit
/// record): registers a reader record named `what`, reads, removes it.
/// For `custos snapshots`.
pub async fn with_reader<T, F>(
    ctx: &Context,
    tenant: &TenantId,
    policy_key: Option<&KeyRef>,
    what: &str,
    f: F,
) -> Result<T>
where
    F: for<'r> FnOnce(&'r Repo) -> BoxFuture<'r, Result<T>>,
{
    crate::store::probe::require_conditional_writes(ctx).await?;
    let mut repo = Repo::open_for(ctx, tenant, policy_key, PolicyUse::ReadsOnly).await?;
    let ttl = crate::store::readers::ttl(ctx.lease_ttl);
    let reader = ReaderGuard::register(repo.store(), &ctx.holder, what, ttl).await?;
    let prepared = async {
        repo.reload().await?;
        repo.hide_pending_deletions().await
    };
    let result = match prepared.await {
        Ok(()) => f(&repo).await,
        Err(e) => Err(e),
    };
    let result = result.and_then(|v| reader.check().map(|()| v));
    reader.release().await;
    repo.forget_keys().await;
    result
}

/// What a gate (see [`run_job_gated`]) decided, under the tenant's lease.
pub enum Gate<P> {
    /// Run the job, handing it `P`.
    Run(P),
    /// Do not run it, for this reason (e.g. another daemon already ran this slot).
    Decline(String),
}

/// How a gated job run ended.
// Returned once per job run and matched at once: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Gated<T> {
    /// The job ran (successfully or not) and was reported like any job.
    Ran(JobRun<T>),
    /// The tenant's lease is held by someone else: nothing ran, nothing was
    /// reported (the caller retries later).
    Contended(Error),
    /// The gate declined: nothing ran, nothing was reported.
    Declined(String),
}

/// [`run_job`] for the scheduler: the repository is opened and the lease
/// taken first; then `gate` decides, under the lease, whether the job runs at
/// all (so "has this slot already run?" cannot race with another daemon).
/// Only a job that passes the gate emits `job.started`; a busy lease or a
/// declining gate leave no report. Failures to open the repository, and of
/// the gate itself, are reported as failed jobs.
pub async fn run_job_gated<'a, T, P, G, F>(
    ctx: &Context,
    spec: JobSpec<'_>,
    gate: G,
    f: F,
) -> Gated<T>
where
    T: JobOutput,
    G: for<'r> FnOnce(&'r Repo, Borrows<'r, 'a>) -> BoxFuture<'r, Result<Gate<P>>>,
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, P, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let started_at = Utc::now();
    let clock = Instant::now();
    let failed = async |e: Error| {
        report::job_started(spec.tenant, spec.job);
        Gated::Ran(finish(ctx, &spec, started_at, clock, Err(e)).await)
    };
    let mut repo = match open_repo(ctx, &spec).await {
        Ok(r) => r,
        // Another process initialised the tenant at the same moment.
        Err(e @ Error::LeaseContended { .. }) => return Gated::Contended(e),
        Err(e) => return failed(e).await,
    };
    let lease = match acquire(ctx, &spec, &mut repo).await {
        Ok(l) => l,
        Err(e @ Error::LeaseContended { .. }) => {
            repo.forget_keys().await;
            return Gated::Contended(e);
        }
        Err(e) => {
            repo.forget_keys().await;
            return failed(e).await;
        }
    };
    let input = match gate(&repo, std::marker::PhantomData).await {
        Ok(Gate::Run(p)) => p,
        Ok(Gate::Decline(why)) => {
            lease.release().await;
            repo.forget_keys().await;
            return Gated::Declined(why);
        }
        Err(e) => {
            lease.release().await;
            repo.forget_keys().await;
            return failed(e).await;
        }
    };
    report::job_started(spec.tenant, spec.job);
    let result = match begin(ctx, &spec).await {
        Ok(()) => f(&repo, &lease, input, std::marker::PhantomData).await,
        Err(e) => Err(e),
    };
    let result = settle_reader(&spec, &repo, &lease, result).await;
    lease.release().await;
    repo.forget_keys().await;
    Gated::Ran(finish(ctx, &spec, started_at, clock, result).await)
}

/// Opens the tenant's repository, initialising it when the spec says so.
/// Refuses a store that ignores conditional writes first: leases and
/// descriptor updates depend on them.
async fn open_repo(ctx: &Context, spec: &JobSpec<'_>) -> Result<Repo> {
    crate::store::probe::require_conditional_writes(ctx).await?;
    match Repo::open_for(ctx, spec.tenant, spec.policy_key, policy_use(spec.job)).await {
        Ok(r) => Ok(r),
        Err(Error::TenantNotFound { .. }) if spec.init_with.is_some() => {
            let key = spec.init_with.expect("checked");
            let (repo, _) = Repo::init(ctx, spec.tenant, key, false).await?;
            tracing::info!(event = "tenant.initialised", tenant = %spec.tenant, key = %key, "tenant initialised");
            Ok(repo)
        }
        Err(e) => Err(e),
    }
}

/// Takes the tenant lease (writers) or registers a reader record (readers),
/// recording a takeover of a dead or expired holder's lease, and re-reads the
/// descriptor: the lifecycle fence (shredding) is checked on the state the
/// lease protects, and a reader reads nothing before its record exists.
async fn acquire(ctx: &Context, spec: &JobSpec<'_>, repo: &mut Repo) -> Result<LeaseGuard> {
    let guard = match JobAccess::of(spec.job) {
        JobAccess::Writer => {
            LeaseGuard::acquire(repo.store(), &ctx.holder, spec.job.as_str(), ctx.lease_ttl).await?
        }
        JobAccess::Reader => LeaseGuard::shared(
            ReaderGuard::register(
                repo.store(),
                &ctx.holder,
                spec.job.as_str(),
                crate::store::readers::ttl(ctx.lease_ttl),
            )
            .await?,
        ),
    };
    let prepared = async {
        repo.reload().await?;
        if hides_pending_deletions(spec.job) {
            repo.hide_pending_deletions().await?;
        }
        Ok::<_, Error>(())
    };
    if let Err(e) = prepared.await {
        guard.release().await;
        return Err(e);
    }
    if let Some(previous) = guard.took_over_from() {
        let details = serde_json::json!({
            "lock": "lease",
            "previous_holder": previous.holder,
            "previous_job": previous.job,
            "expired_at": previous.expires_at,
            "reason": guard.takeover_reason(),
        });
        if let Err(e) = ctx
            .record("lease.takeover", Some(spec.tenant), details)
            .await
        {
            tracing::error!(event = "audit.failed", error = %e, "could not record a lease takeover");
        }
    }
    Ok(guard)
}

/// The end of a reader's run. A tenant shred is the one writer that may cut
/// readers off: whatever broke then (a key destroyed, objects gone), the
/// reader fails naming the shred (`tenant_unavailable`). A reader whose record
/// lapsed (see [`ReaderGuard::check`]) fails with `reader_lost`: a deleter may
/// have ignored it, so what it found cannot be trusted, except a restore that
/// completed (every blob it wrote was authenticated and hashed to its id).
async fn settle_reader<T>(
    spec: &JobSpec<'_>,
    repo: &Repo,
    guard: &LeaseGuard,
    result: Result<T>,
) -> Result<T> {
    let Some(reader) = guard.reader() else {
        return result;
    };
    if result.is_err()
        && let Ok(now) = Repo::open(repo.context(), repo.tenant(), None).await
        && let Err(fenced) = now.require_active("reading its data")
    {
        return Err(fenced);
    }
    match reader.check() {
        Err(lost) if result.is_err() || spec.job != JobKind::Restore => Err(lost),
        _ => result,
    }
}

/// The `<job>.begin` record of a destructive job; if it cannot be written, the
/// job does not run.
async fn begin(ctx: &Context, spec: &JobSpec<'_>) -> Result<()> {
    if destructive(spec.job) {
        let details = serde_json::json!({ "holder": ctx.holder, "store": ctx.store_url });
        ctx.record(
            &audit_event(spec.job, Phase::Begin),
            Some(spec.tenant),
            details,
        )
        .await?;
    }
    Ok(())
}

/// Builds, logs (`job.finished`), writes and audits the report of a job run.
async fn finish<T: JobOutput>(
    ctx: &Context,
    spec: &JobSpec<'_>,
    started_at: chrono::DateTime<Utc>,
    clock: Instant,
    result: Result<T>,
) -> JobRun<T> {
    let finished_at = Utc::now();
    // A job may finish "successfully" with a failed outcome (a drill that ran
    // and failed): its report keeps the details either way.
    let (outcome, error_kind, error, metrics, value) = match &result {
        Ok(v) => match v.failure() {
            None => (
                Outcome::Success,
                None,
                None,
                v.metrics(),
                serde_json::to_value(v).unwrap_or_default(),
            ),
            Some((kind, message)) => (
                Outcome::Failure,
                Some(kind),
                Some(message),
                v.metrics(),
                serde_json::to_value(v).unwrap_or_default(),
            ),
        },
        Err(e) => match T::from_error(spec.tenant, e) {
            None => (
                Outcome::Failure,
                Some(e.kind()),
                Some(e.to_string()),
                Default::default(),
                serde_json::Value::Null,
            ),
            Some(v) => {
                let (kind, message) = v.failure().unwrap_or((e.kind(), e.to_string()));
                (
                    Outcome::Failure,
                    Some(kind),
                    Some(message),
                    v.metrics(),
                    serde_json::to_value(&v).unwrap_or_default(),
                )
            }
        },
    };
    let report = JobReport {
        tenant: spec.tenant.clone(),
        job: spec.job,
        outcome,
        started_at,
        finished_at,
        duration_ms: clock.elapsed().as_millis() as u64,
        metrics,
        error_kind,
        error,
        result: value,
    };
    report::job_finished(&report);
    if let Err(e) = ctx.state.write_report(&report) {
        tracing::error!(error = %e, "could not write the job report");
    }
    let mut result = result;
    if let Err(e) = ctx
        .record(
            &audit_event(spec.job, Phase::End),
            Some(spec.tenant),
            audit_details(&report),
        )
        .await
    {
        tracing::error!(event = "audit.failed", tenant = %spec.tenant, job = %spec.job, error = %e, "could not record the job in the audit log");
        // A destructive action that cannot be recorded is reported as a failure,
        // so that someone looks; the action itself is already done.
        if destructive(spec.job) && result.is_ok() {
            result = Err(Error::Internal(format!(
                "{} finished but could not be recorded in the audit log: {e}",
                spec.job
            )));
        }
    }
    JobRun { report, result }
}

/// Jobs that destroy data or keys: recorded before (`<job>.begin`) and after
/// (`<job>.end`); if the first record cannot be written, the job does not run.
fn destructive(job: JobKind) -> bool {
    matches!(
        job,
        JobKind::Forget | JobKind::Prune | JobKind::Rotate | JobKind::Shred
    )
}

enum Phase {
    Begin,
    End,
}

fn audit_event(job: JobKind, phase: Phase) -> String {
    match (destructive(job), phase) {
        (true, Phase::Begin) => format!("{job}.begin"),
        (true, Phase::End) => format!("{job}.end"),
        (false, _) => job.as_str().to_owned(),
    }
}

/// What the audit log keeps of a job: its outcome and headline numbers (the
/// full result stays in the job report). Never key material.
fn audit_details(r: &JobReport) -> serde_json::Value {
    serde_json::json!({
        "outcome": r.outcome,
        "error_kind": r.error_kind,
        "error": r.error,
        "duration_ms": r.duration_ms,
        "snapshot": r.metrics.snapshot,
        "files": r.metrics.files,
        "bytes_in": r.metrics.bytes_in,
        "bytes_stored": r.metrics.bytes_stored,
    })
}

//! Runs one job for one tenant the same way for the CLI and the daemon: open
//! (or initialise) the repository, take the tenant lease, run, release, and
//! report: `job.started` / `job.finished` events and a JSON job report.

use std::time::Instant;

use chrono::Utc;
use futures::future::BoxFuture;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::report::{self, JobKind, JobOutput, JobReport, Outcome};
use crate::store::lease::LeaseGuard;
use crate::tenant::TenantId;

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
    finish(ctx, &spec, started_at, clock, result)
}

/// Builds, logs (`job.finished`) and writes the report of a job run.
fn finish<T: JobOutput>(
    ctx: &Context,
    spec: &JobSpec<'_>,
    started_at: chrono::DateTime<Utc>,
    clock: Instant,
    result: Result<T>,
) -> JobRun<T> {
    let finished_at = Utc::now();
    let (outcome, error_kind, error, metrics, value) = match &result {
        Ok(v) => (
            Outcome::Success,
            None,
            None,
            v.metrics(),
            serde_json::to_value(v).unwrap_or_default(),
        ),
        Err(e) => (
            Outcome::Failure,
            Some(e.kind()),
            Some(e.to_string()),
            Default::default(),
            serde_json::Value::Null,
        ),
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
    JobRun { report, result }
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
    let failed = |e: Error| {
        report::job_started(spec.tenant, spec.job);
        Gated::Ran(finish(ctx, &spec, started_at, clock, Err(e)))
    };
    let repo = match open_repo(ctx, &spec).await {
        Ok(r) => r,
        // Another process initialised the tenant at the same moment.
        Err(e @ Error::LeaseContended { .. }) => return Gated::Contended(e),
        Err(e) => return failed(e),
    };
    let lease = match LeaseGuard::acquire(
        repo.store(),
        &ctx.holder,
        spec.job.as_str(),
        ctx.lease_ttl,
    )
    .await
    {
        Ok(l) => l,
        Err(e @ Error::LeaseContended { .. }) => {
            repo.forget_keys().await;
            return Gated::Contended(e);
        }
        Err(e) => {
            repo.forget_keys().await;
            return failed(e);
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
            return failed(e);
        }
    };
    report::job_started(spec.tenant, spec.job);
    let result = f(&repo, &lease, input, std::marker::PhantomData).await;
    lease.release().await;
    repo.forget_keys().await;
    Gated::Ran(finish(ctx, &spec, started_at, clock, result))
}

/// Opens the tenant's repository, initialising it when the spec says so.
async fn open_repo(ctx: &Context, spec: &JobSpec<'_>) -> Result<Repo> {
    match Repo::open(ctx, spec.tenant, spec.policy_key).await {
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

async fn run_inner<'a, T, F>(ctx: &Context, spec: &JobSpec<'_>, f: F) -> Result<T>
where
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let repo = open_repo(ctx, spec).await?;
    let lease =
        LeaseGuard::acquire(repo.store(), &ctx.holder, spec.job.as_str(), ctx.lease_ttl).await?;
    let result = f(&repo, &lease, std::marker::PhantomData).await;
    lease.release().await;
    repo.forget_keys().await;
    result
}

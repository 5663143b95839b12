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

async fn run_inner<'a, T, F>(ctx: &Context, spec: &JobSpec<'_>, f: F) -> Result<T>
where
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    // Leases need conditional writes: refuse a store that ignores them.
    crate::store::probe::require_conditional_writes(ctx).await?;
    let repo = match Repo::open(ctx, spec.tenant, spec.policy_key).await {
        Ok(r) => r,
        Err(Error::TenantNotFound { .. }) if spec.init_with.is_some() => {
            let key = spec.init_with.expect("checked");
            let (repo, _) = Repo::init(ctx, spec.tenant, key, false).await?;
            tracing::info!(event = "tenant.initialised", tenant = %spec.tenant, key = %key, "tenant initialised");
            repo
        }
        Err(e) => return Err(e),
    };
    let lease =
        LeaseGuard::acquire(repo.store(), &ctx.holder, spec.job.as_str(), ctx.lease_ttl).await?;
    let result = f(&repo, &lease, std::marker::PhantomData).await;
    lease.release().await;
    repo.forget_keys().await;
    result
}

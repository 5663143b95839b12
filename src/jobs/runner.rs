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
    if let Some(previous) = lease.took_over_from() {
        let details = serde_json::json!({ "previous_holder": previous.holder, "previous_job": previous.job, "expired_at": previous.expires_at });
        if let Err(e) = ctx
            .record("lease.takeover", Some(spec.tenant), details)
            .await
        {
            tracing::error!(event = "audit.failed", error = %e, "could not record a lease takeover");
        }
    }
    if destructive(spec.job) {
        let details = serde_json::json!({ "holder": ctx.holder, "store": ctx.store_url });
        if let Err(e) = ctx
            .record(
                &audit_event(spec.job, Phase::Begin),
                Some(spec.tenant),
                details,
            )
            .await
        {
            lease.release().await;
            return Err(e);
        }
    }
    let result = f(&repo, &lease, std::marker::PhantomData).await;
    lease.release().await;
    repo.forget_keys().await;
    result
}

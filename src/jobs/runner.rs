//! Runs one job for one tenant the same way for the CLI and the daemon: open
//! (or initialise) the repository, take the tenant lease, run, release, and
//! report: `job.started` / `job.finished` events, a JSON job report, and the
//! audit log (`<job>` records; `<job>.begin` / `<job>.end` around jobs that
//! destroy data or keys).

use std::time::Instant;

use chrono::Utc;
use futures::FutureExt;
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
    finish(ctx, &spec, started_at, clock, result).await
}

async fn run_inner<'a, T, F>(ctx: &Context, spec: &JobSpec<'_>, f: F) -> Result<T>
where
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let mut repo = open_repo(ctx, spec).await?;
    let lease = acquire(ctx, spec, &mut repo).await?;
    let result = match begin(ctx, spec).await {
        Ok(()) => caught(spec, f(&repo, &lease, std::marker::PhantomData)).await,
        Err(e) => Err(e),
    };
    lease.release().await;
    repo.forget_keys().await;
    result
}

/// Runs a future that holds the tenant's lease, turning a panic into an
/// `internal` error: the caller then releases the lease and reports the run
/// as failed, instead of unwinding past the release and leaving the tenant
/// locked until the lease expires (and the daemon logging `job.panicked`).
/// Unwind safety: after a panic only the lease and the key cache are touched
/// (released and cleared), never state the panicking code was changing.
async fn caught<T>(spec: &JobSpec<'_>, job: impl Future<Output = Result<T>>) -> Result<T> {
    match std::panic::AssertUnwindSafe(job).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(Error::Internal(format!(
                "{} of {} panicked (a bug in custos; please report it): {what}; the tenant's lease was released",
                spec.job, spec.tenant
            )))
        }
    }
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
    let input = match caught(&spec, gate(&repo, std::marker::PhantomData)).await {
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
        Ok(()) => caught(&spec, f(&repo, &lease, input, std::marker::PhantomData)).await,
        Err(e) => Err(e),
    };
    lease.release().await;
    repo.forget_keys().await;
    Gated::Ran(finish(ctx, &spec, started_at, clock, result).await)
}

/// Opens the tenant's repository, initialising it when the spec says so.
/// Refuses a store that ignores conditional writes first: leases and
/// descriptor updates depend on them.
async fn open_repo(ctx: &Context, spec: &JobSpec<'_>) -> Result<Repo> {
    crate::store::probe::require_conditional_writes(ctx).await?;
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

/// Takes the tenant lease, recording a takeover of a crashed holder's lease,
/// and re-reads the descriptor: the lifecycle fence (shredding) is checked on
/// the state the lease protects, not on what was read before it was taken.
async fn acquire(ctx: &Context, spec: &JobSpec<'_>, repo: &mut Repo) -> Result<LeaseGuard> {
    let lease =
        LeaseGuard::acquire(repo.store(), &ctx.holder, spec.job.as_str(), ctx.lease_ttl).await?;
    if let Err(e) = repo.reload().await {
        lease.release().await;
        return Err(e);
    }
    if let Some(previous) = lease.took_over_from() {
        let details = serde_json::json!({
            "previous_holder": previous.holder,
            "previous_job": previous.job,
            "expired_at": previous.expires_at,
        });
        if let Err(e) = ctx
            .record("lease.takeover", Some(spec.tenant), details)
            .await
        {
            tracing::error!(event = "audit.failed", error = %e, "could not record a lease takeover");
        }
    }
    Ok(lease)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::Outcome;

    /// A job of its own output type, so the tests need no real job.
    #[derive(serde::Serialize)]
    struct Nothing;
    impl JobOutput for Nothing {}

    fn setup() -> (tempfile::TempDir, Context, TenantId, KeyRef) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::embedded(dir.path()).unwrap();
        let tenant = TenantId::new("acme").unwrap();
        let key = KeyRef::parse("local:acme").unwrap();
        (dir, ctx, tenant, key)
    }

    /// The lease is free: another holder takes it at once.
    async fn assert_lease_free(ctx: &Context, tenant: &TenantId) {
        let store = crate::store::TenantStore::new(ctx.store.clone(), tenant);
        let other = LeaseGuard::acquire(&store, "someone-else", "backup", Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("the lease should be free after the panic: {e}"));
        other.release().await;
    }

    #[tokio::test]
    async fn a_panicking_job_releases_the_lease_and_fails_as_internal() {
        let (_dir, ctx, tenant, key) = setup();
        let spec = JobSpec {
            tenant: &tenant,
            job: JobKind::Backup,
            policy_key: Some(&key),
            init_with: Some(&key),
        };
        let run = run_job(&ctx, spec, |_, lease, _| {
            async move {
                // The job really held the lease when it panicked.
                lease.ensure_held()?;
                // The panic of issue 12: date arithmetic that overflows.
                let start = std::hint::black_box(chrono::DateTime::<Utc>::MIN_UTC);
                let _ = start - chrono::Duration::days(1);
                Ok(Nothing)
            }
            .boxed()
        })
        .await;
        let err = run.result.err().expect("a panic is an error");
        assert_eq!(err.kind(), "internal");
        let message = err.to_string();
        assert!(
            message.contains("backup of acme panicked")
                && message.contains("a bug in custos")
                && message.contains("`DateTime - TimeDelta` overflowed"),
            "{message}"
        );
        assert_eq!(run.report.outcome, Outcome::Failure);
        assert_eq!(run.report.error_kind, Some("internal"));
        assert_lease_free(&ctx, &tenant).await;

        // And the next job of the tenant runs.
        let spec = JobSpec {
            tenant: &tenant,
            job: JobKind::Backup,
            policy_key: Some(&key),
            init_with: None,
        };
        let run = run_job(&ctx, spec, |_, _, _| async { Ok(Nothing) }.boxed()).await;
        assert!(run.result.is_ok());
        assert_eq!(run.report.outcome, Outcome::Success);
    }

    #[tokio::test]
    async fn a_panic_in_a_gate_or_a_gated_job_releases_the_lease() {
        let (_dir, ctx, tenant, key) = setup();
        Repo::init(&ctx, &tenant, &key, false).await.unwrap();
        let spec = || JobSpec {
            tenant: &tenant,
            job: JobKind::Forget,
            policy_key: Some(&key),
            init_with: None,
        };
        let gated = run_job_gated(
            &ctx,
            spec(),
            |_, _| async { panic!("gate bug") }.boxed(),
            |_, _, (), _| async { Ok(Nothing) }.boxed(),
        )
        .await;
        let Gated::Ran(run) = gated else {
            panic!("a panicking gate is reported as a failed run")
        };
        let err = run.result.err().expect("a panic is an error");
        assert_eq!(err.kind(), "internal");
        assert!(err.to_string().contains("gate bug"), "{err}");
        assert_lease_free(&ctx, &tenant).await;

        let gated: Gated<Nothing> = run_job_gated(
            &ctx,
            spec(),
            |_, _| async { Ok(Gate::Run(())) }.boxed(),
            |_, _, (), _| async { panic!("{}", String::from("job bug")) }.boxed(),
        )
        .await;
        let Gated::Ran(run) = gated else {
            panic!("the job ran")
        };
        let err = run.result.err().expect("a panic is an error");
        assert_eq!(err.kind(), "internal");
        assert!(err.to_string().contains("job bug"), "{err}");
        assert_eq!(run.report.outcome, Outcome::Failure);
        assert_lease_free(&ctx, &tenant).await;
    }
}

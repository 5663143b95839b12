//! Runs one job for one tenant the same way for the CLI and the daemon: open
//! (or initialise) the repository, take the tenant lease (writers) or
//! register a reader record (readers, see [`JobAccess`]), run, release, and
//! report: `job.started` / `job.finished` events, a JSON job report, and the
//! audit log: `<job>.begin` before the job touches tenant data or keys (no
//! record, no job: `audit_unavailable`) and `<job>.end` with its outcome.

use std::time::Instant;

use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::audit::log::Replication;
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
    let (began, result) = run_inner(ctx, &spec, f).await;
    finish(ctx, &spec, began, started_at, clock, result).await
}

async fn run_inner<'a, T, F>(ctx: &Context, spec: &JobSpec<'_>, f: F) -> (Began, Result<T>)
where
    F: for<'r> FnOnce(&'r Repo, &'r LeaseGuard, Borrows<'r, 'a>) -> BoxFuture<'r, Result<T>>,
{
    let mut repo = match open_repo(ctx, spec).await {
        Ok(r) => r,
        Err(e) => return (Began::No, Err(e)),
    };
    let lease = match acquire(ctx, spec, &mut repo).await {
        Ok(l) => l,
        Err(e) => return (Began::No, Err(e)),
    };
    let (began, result) = match begin(ctx, spec).await {
        Ok((seq, replication)) => (
            Began::Recorded(seq),
            beside(
                replication,
                caught(spec, f(&repo, &lease, std::marker::PhantomData)),
            )
            .await,
        ),
        Err(e) => (Began::Unrecorded, Err(e)),
    };
    let result = settle_reader(spec, &repo, &lease, result).await;
    lease.release().await;
    repo.forget_keys().await;
    (began, result)
}

/// Runs the job while its `<job>.begin` record is copied to the store (the
/// record itself is in the local log before the job starts), and waits for
/// the copy after the job. The copy is a task of its own, not a future
/// polled beside the job's: a job may block its task for its whole run (the
/// backup walks its sources in `block_in_place`), which would stall the copy
/// and hold the audit log's lock, and so every other job's `begin`, as long.
async fn beside<T>(replication: Option<Replication>, job: impl Future<Output = T>) -> T {
    let copy = replication.map(|r| (r.health(), tokio::spawn(r.run())));
    let out = job.await;
    if let Some((health, copy)) = copy
        && let Err(e) = copy.await
    {
        health.replication_failed();
        tracing::error!(event = "audit.replication_failed", error = %e, "the copy of an audit record to the store did not finish");
    }
    out
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

/// Runs `f` as a reader outside the job machinery (no job report):
/// registers a reader record named `what`, reads between the `<what>.begin`
/// and `<what>.end` audit records ([`record_access`]), removes the record.
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
    let result = match repo.reload(true).await {
        Ok(()) => record_access(ctx, tenant, what, f(&repo)).await,
        Err(e) => Err(e),
    };
    // As `settle_reader`: a reader whose record lapsed or was removed does
    // not report what it read, failed or not.
    let result = match (reader.confirm().await, result) {
        (Err(lost), _) => Err(lost),
        (Ok(()), result) => result,
    };
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
        Gated::Ran(finish(ctx, &spec, Began::No, started_at, clock, Err(e)).await)
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
    let (began, result) = match begin(ctx, &spec).await {
        Ok((seq, replication)) => (
            Began::Recorded(seq),
            beside(
                replication,
                caught(&spec, f(&repo, &lease, input, std::marker::PhantomData)),
            )
            .await,
        ),
        Err(e) => (Began::Unrecorded, Err(e)),
    };
    let result = settle_reader(&spec, &repo, &lease, result).await;
    lease.release().await;
    repo.forget_keys().await;
    Gated::Ran(finish(ctx, &spec, began, started_at, clock, result).await)
}

/// Opens the tenant's repository, initialising it when the spec says so.
/// Refuses a store that ignores conditional writes first: leases and
/// descriptor updates depend on them.
async fn open_repo(ctx: &Context, spec: &JobSpec<'_>) -> Result<Repo> {
    crate::store::probe::require_conditional_writes(ctx).await?;
    // One key, one tenant, for every job whose policy names a key: the
    // registry of this host is cheap to read (a first init checks the store too).
    if let Some(key) = spec.policy_key {
        crate::repo::ownership::check_registry(ctx, spec.tenant, key)?;
    }
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
    if let Err(e) = repo.reload(hides_pending_deletions(spec.job)).await {
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
/// lapsed or was removed (see [`ReaderGuard::confirm`]) fails with `reader_lost`: a deleter may
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
    if result.is_ok() && spec.job == JobKind::Restore {
        return result;
    }
    // Read back from the store, not only as the keepalive last saw it: a
    // record removed since its last renewal must fail the reader too.
    match reader.confirm().await {
        Err(lost) => Err(lost),
        Ok(()) => result,
    }
}

/// How far a job got with its `<job>.begin` record.
#[derive(Debug, Clone, Copy)]
enum Began {
    /// It failed before its beginning (repository, lease): it touched nothing.
    No,
    /// Recorded, as this audit record (`None`: a context without audit log).
    Recorded(Option<u64>),
    /// The record could not be written, so the job did not run.
    Unrecorded,
}

/// The `<job>.begin` record, written before the job reads or writes any
/// tenant data or key: a job whose access cannot be recorded does not run.
/// Returns the record's sequence number and its copy to the store, which
/// runs beside the job (the local log is the record the job waits for).
async fn begin(ctx: &Context, spec: &JobSpec<'_>) -> Result<(Option<u64>, Option<Replication>)> {
    let details = serde_json::json!({ "holder": ctx.holder, "store": ctx.store_url });
    match ctx
        .record_deferring_replication(
            &audit_event(spec.job, Phase::Begin),
            Some(spec.tenant),
            details,
        )
        .await
    {
        Ok((receipt, replication)) => Ok((receipt.map(|r| r.seq), replication)),
        Err(Error::AuditUnavailable { event, reason }) => Err(Error::AuditUnavailable {
            event,
            reason: format!(
                "{reason}; the {} of tenant {} did not start: no tenant data or key was touched",
                spec.job, spec.tenant
            ),
        }),
        Err(e) => Err(e),
    }
}

/// Builds, logs (`job.finished`), writes and audits the report of a job run.
async fn finish<T: JobOutput>(
    ctx: &Context,
    spec: &JobSpec<'_>,
    began: Began,
    started_at: chrono::DateTime<Utc>,
    clock: Instant,
    result: Result<T>,
) -> JobRun<T> {
    let finished_at = Utc::now();
    // A job may finish "successfully" with a failed outcome (a drill that ran
    // and failed): its report keeps the details either way.
    let (outcome, error_kind, error, metrics, value, audit_result) = match &result {
        Ok(v) => match v.failure() {
            None => (
                Outcome::Success,
                None,
                None,
                v.metrics(),
                serde_json::to_value(v).unwrap_or_default(),
                v.audit_result(),
            ),
            Some((kind, message)) => (
                Outcome::Failure,
                Some(kind),
                Some(message),
                v.metrics(),
                serde_json::to_value(v).unwrap_or_default(),
                v.audit_result(),
            ),
        },
        Err(e) => match T::from_error(spec.tenant, e) {
            None => (
                Outcome::Failure,
                Some(e.kind().as_str()),
                Some(e.to_string()),
                Default::default(),
                serde_json::Value::Null,
                None,
            ),
            Some(v) => {
                let (kind, message) = v.failure().unwrap_or((e.kind().as_str(), e.to_string()));
                (
                    Outcome::Failure,
                    Some(kind),
                    Some(message),
                    v.metrics(),
                    serde_json::to_value(&v).unwrap_or_default(),
                    v.audit_result(),
                )
            }
        },
    };
    let mut report = JobReport {
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
    let mut result = result;
    // The end record comes before the report is logged and written, so that
    // a job whose end cannot be recorded is reported as such. A job whose
    // begin could not be recorded did not run: there is no end to record.
    let begin_seq = match began {
        Began::Unrecorded => None,
        // Failed on the audit log before its beginning (a tenant init's record).
        Began::No if matches!(result, Err(Error::AuditUnavailable { .. })) => None,
        Began::No => Some(None),
        Began::Recorded(seq) => Some(seq),
    };
    if let Some(begin_seq) = begin_seq {
        let mut details = audit_details(&report);
        details["begin_seq"] = begin_seq.into();
        if let Some(r) = audit_result {
            details["result"] = r;
        }
        let recorded = ctx
            .record(
                &audit_event(spec.job, Phase::End),
                Some(spec.tenant),
                details,
            )
            .await;
        if let Err(e) = recorded {
            tracing::error!(event = "audit.failed", tenant = %spec.tenant, job = %spec.job, error = %e, "could not record the end of the job in the audit log");
            // A job that ran is not undone, but it does not pass as a clean
            // success either: its effect is there and the log lacks its end.
            if result.is_ok() {
                let e = end_unrecorded(spec, &report, begin_seq, e);
                report.outcome = Outcome::Failure;
                report.error_kind = Some(e.kind().as_str());
                report.error = Some(e.to_string());
                result = Err(e);
            }
        }
    }
    report::job_finished(&report);
    if let Err(e) = ctx.state.write_report(&report) {
        tracing::error!(error = %e, "could not write the job report");
    }
    JobRun { report, result }
}

/// Records an access to a tenant's data or keys made outside [`run_job`]
/// (`snapshots`, `tenant show`): `<action>.begin` before `access` runs (it
/// does not run without it), `<action>.end` with its outcome after.
pub async fn record_access<T>(
    ctx: &Context,
    tenant: &TenantId,
    action: &str,
    access: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let details = serde_json::json!({ "holder": ctx.holder, "store": ctx.store_url });
    let begin_seq = match ctx
        .record(&format!("{action}.begin"), Some(tenant), details)
        .await
    {
        Ok(receipt) => receipt.map(|r| r.seq),
        Err(Error::AuditUnavailable { event, reason }) => {
            return Err(Error::AuditUnavailable {
                event,
                reason: format!("{reason}; nothing of tenant {tenant} was read"),
            });
        }
        Err(e) => return Err(e),
    };
    let result = access.await;
    let details = serde_json::json!({
        "outcome": if result.is_ok() { Outcome::Success } else { Outcome::Failure },
        "error_kind": result.as_ref().err().map(Error::kind),
        "begin_seq": begin_seq,
    });
    match ctx
        .record(&format!("{action}.end"), Some(tenant), details)
        .await
    {
        Ok(_) => result,
        Err(e) => {
            tracing::error!(event = "audit.failed", tenant = %tenant, action, error = %e, "could not record the end of an access in the audit log");
            match (result, e) {
                (Ok(_), Error::AuditUnavailable { event, reason }) => {
                    Err(Error::AuditUnavailable {
                        event,
                        reason: format!(
                            "{reason}; the data of tenant {tenant} was read, but the end of the access is not in the audit log"
                        ),
                    })
                }
                (Ok(_), e) => Err(e),
                (Err(e), _) => Err(e),
            }
        }
    }
}

/// The error of a job that ran but whose `.end` record could not be written:
/// it says what the job did, so nobody runs it again believing it failed.
fn end_unrecorded(
    spec: &JobSpec<'_>,
    report: &JobReport,
    begin_seq: Option<u64>,
    e: Error,
) -> Error {
    let (event, reason) = match e {
        Error::AuditUnavailable { event, reason } => (event, reason),
        e => (audit_event(spec.job, Phase::End), e.to_string()),
    };
    let snapshot = report
        .metrics
        .snapshot
        .as_ref()
        .map(|s| format!(", snapshot {s}"))
        .unwrap_or_default();
    let begin = begin_seq
        .map(|s| format!(" (its begin is audit record {s})"))
        .unwrap_or_default();
    let outcome = match report.outcome {
        Outcome::Success => "succeeded",
        Outcome::Failure => "failed",
    };
    Error::AuditUnavailable {
        event,
        reason: format!(
            "{reason}; the {} of tenant {} ran ({outcome}{snapshot}) and its effect is in place, but its end is not in the audit log{begin}",
            spec.job, spec.tenant,
        ),
    }
}

enum Phase {
    Begin,
    End,
}

/// `<job>.begin` and `<job>.end` for every job.
fn audit_event(job: JobKind, phase: Phase) -> String {
    match phase {
        Phase::Begin => format!("{job}.begin"),
        Phase::End => format!("{job}.end"),
    }
}

/// What the audit log keeps of a job: its outcome and headline numbers, and
/// the job's own figures ([`JobOutput::audit_result`], as `result`); the
/// full result stays in the job report. Never key material.
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

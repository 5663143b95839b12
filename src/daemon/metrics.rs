//! The daemon's metrics, rendered in the Prometheus text format (0.0.4) by
//! the HTTP endpoint (see [`super::http`]), and its health: the scheduler
//! loop stamps a tick every time round; `/healthz` fails once no tick came
//! for more than twice the tick interval.
//!
//! Timestamps (last run, last success) and key information are restored from
//! the daemon's state file at start, so alerts such as "no successful backup
//! for 26 h" survive a restart; counters start from zero, as Prometheus expects.
//!
//! The job kind is the label `kind`, not `job`: Prometheus gives every
//! scraped series its own `job` label (the scrape job), and a `job` of ours
//! would arrive renamed to `exported_job` unless scraped with `honor_labels`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::registry::{KeyInfo, ScheduledJob};
use super::state::{JobRecord, RunOutcome};
use crate::audit::health::AuditHealth;
use crate::jobs::drill::DrillReport;
use crate::report::{JobKind, JobReport};
use crate::tenant::TenantId;

/// Per tenant and job.
#[derive(Debug, Clone, Default)]
struct JobStats {
    runs: BTreeMap<&'static str, u64>,
    failures: u64,
    contended: u64,
    last_duration: Option<f64>,
    last_run: Option<DateTime<Utc>>,
    last_success: Option<DateTime<Utc>>,
    last_outcome: Option<RunOutcome>,
    next_run: Option<DateTime<Utc>>,
    last_bytes_in: Option<u64>,
    last_bytes_stored: Option<u64>,
    last_files: Option<u64>,
    unsupported: bool,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<(TenantId, ScheduledJob), JobStats>,
    keys: BTreeMap<TenantId, KeyInfo>,
    /// Job-specific gauges of the last successful run: (job, name) → tenant → value.
    gauges: BTreeMap<(JobKind, String), BTreeMap<TenantId, f64>>,
    running: usize,
    tenants: usize,
    policy_rejected: u64,
    reloads: BTreeMap<&'static str, u64>,
    rto: BTreeMap<TenantId, RtoStats>,
    audit: Option<Arc<AuditHealth>>,
}

/// Per tenant: the drills that restored under an RTO, passed or failed.
#[derive(Debug, Clone, Copy, Default)]
struct RtoStats {
    last_met: bool,
    missed: u64,
}

pub struct Metrics {
    inner: Mutex<Inner>,
    started: Instant,
    started_at: DateTime<Utc>,
    /// Milliseconds since `started` at the scheduler's last tick.
    last_tick_ms: AtomicU64,
    tick: Duration,
    holder: String,
    mode: &'static str,
}

impl Metrics {
    pub fn new(tick: Duration, holder: String, mode: &'static str) -> Metrics {
        Metrics {
            inner: Mutex::new(Inner::default()),
            started: Instant::now(),
            started_at: Utc::now(),
            last_tick_ms: AtomicU64::new(0),
            tick,
            holder,
            mode,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scheduler loop went round.
    pub fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the scheduler's last tick.
    pub fn tick_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)))
    }

    /// Healthy while the scheduler ticked within twice its tick interval.
    pub fn healthy(&self) -> bool {
        self.tick_age() <= self.tick * 2
    }

    pub fn tick_interval(&self) -> Duration {
        self.tick
    }

    /// Seeds the timestamps of a job from the persisted state.
    pub fn restore(&self, tenant: &TenantId, job: ScheduledJob, rec: &JobRecord) {
        let mut inner = self.lock();
        let s = inner.jobs.entry((tenant.clone(), job)).or_default();
        s.last_run = rec.last_started;
        s.last_success = rec.last_success;
        s.last_outcome = rec.last_outcome;
        s.last_duration = rec.last_duration_ms.map(|ms| ms as f64 / 1000.0);
    }

    pub fn set_keys(&self, tenant: &TenantId, keys: &KeyInfo) {
        self.lock().keys.insert(tenant.clone(), keys.clone());
    }

    /// Exports the audit log's failure counts.
    pub fn watch_audit(&self, health: Arc<AuditHealth>) {
        self.lock().audit = Some(health);
    }

    pub fn set_tenants(&self, n: usize) {
        self.lock().tenants = n;
    }

    pub fn set_running(&self, n: usize) {
        self.lock().running = n;
    }

    pub fn set_next(&self, tenant: &TenantId, job: ScheduledJob, at: Option<DateTime<Utc>>) {
        self.lock()
            .jobs
            .entry((tenant.clone(), job))
            .or_default()
            .next_run = at;
    }

    pub fn set_unsupported(&self, tenant: &TenantId, job: ScheduledJob) {
        self.lock()
            .jobs
            .entry((tenant.clone(), job))
            .or_default()
            .unsupported = true;
    }

    /// Forgets a tenant (its policy was removed).
    pub fn remove_tenant(&self, tenant: &TenantId) {
        let mut inner = self.lock();
        inner.jobs.retain(|(t, _), _| t != tenant);
        inner.keys.remove(tenant);
        inner.rto.remove(tenant);
        for values in inner.gauges.values_mut() {
            values.remove(tenant);
        }
    }

    /// Forgets one job of a tenant (its schedule was removed).
    pub fn remove_job(&self, tenant: &TenantId, job: ScheduledJob) {
        self.lock().jobs.remove(&(tenant.clone(), job));
    }

    pub fn contended(&self, tenant: &TenantId, job: ScheduledJob) {
        self.lock()
            .jobs
            .entry((tenant.clone(), job))
            .or_default()
            .contended += 1;
    }

    pub fn policy_rejected(&self, n: usize) {
        self.lock().policy_rejected += n as u64;
    }

    pub fn reloaded(&self, outcome: &'static str) {
        *self.lock().reloads.entry(outcome).or_default() += 1;
    }

    /// Records a run that ended (or was decided) without a job report.
    pub fn outcome(
        &self,
        tenant: &TenantId,
        job: ScheduledJob,
        outcome: RunOutcome,
        at: DateTime<Utc>,
    ) {
        let mut inner = self.lock();
        let s = inner.jobs.entry((tenant.clone(), job)).or_default();
        *s.runs.entry(outcome.as_str()).or_default() += 1;
        if outcome.is_failure() {
            s.failures += 1;
        }
        if outcome != RunOutcome::Skipped {
            s.last_run = Some(at);
            s.last_outcome = Some(outcome);
        }
    }

    /// Records a run another daemon did (its slot mark said so).
    pub fn done_elsewhere(
        &self,
        tenant: &TenantId,
        job: ScheduledJob,
        success_at: Option<DateTime<Utc>>,
    ) {
        let mut inner = self.lock();
        let s = inner.jobs.entry((tenant.clone(), job)).or_default();
        *s.runs.entry(RunOutcome::Skipped.as_str()).or_default() += 1;
        if let Some(t) = success_at {
            s.last_success = s.last_success.max(Some(t));
        }
    }

    /// Records a job that ran, from its report.
    pub fn report(&self, job: ScheduledJob, r: &JobReport) {
        let success = r.outcome == crate::report::Outcome::Success;
        let mut inner = self.lock();
        let s = inner.jobs.entry((r.tenant.clone(), job)).or_default();
        let outcome = if success {
            RunOutcome::Success
        } else {
            RunOutcome::Failure
        };
        *s.runs.entry(outcome.as_str()).or_default() += 1;
        s.last_duration = Some(r.duration_ms as f64 / 1000.0);
        s.last_run = Some(r.started_at);
        s.last_outcome = Some(outcome);
        if success {
            s.last_success = Some(r.finished_at);
            s.last_bytes_in = r.metrics.bytes_in;
            s.last_bytes_stored = r.metrics.bytes_stored;
            s.last_files = r.metrics.files;
        } else {
            s.failures += 1;
        }
        // The RTO verdict is the drill's own (its report's `rto_met`), kept
        // for failed drills too: a missed RTO fails the drill, and the
        // job-specific gauges below are those of successes only.
        if r.job == JobKind::Drill
            && let Some(met) = DrillReport::deserialize(&r.result)
                .ok()
                .and_then(|d| d.rto_met)
        {
            let rto = inner.rto.entry(r.tenant.clone()).or_default();
            rto.last_met = met;
            rto.missed += u64::from(!met);
        }
        if success {
            for (name, value) in &r.metrics.gauges {
                inner
                    .gauges
                    .entry((r.job, name.clone()))
                    .or_default()
                    .insert(r.tenant.clone(), *value);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = Utc::now();
        let inner = self.lock();
        let mut out = Exposition::default();
        let ts = |t: &DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;

        out.family(
            "custos_daemon_info",
            "gauge",
            "Always 1; labels say which daemon this is.",
        );
        out.sample(
            "custos_daemon_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("holder", &self.holder),
                ("mode", self.mode),
            ],
            1.0,
        );
        out.single(
            "custos_daemon_start_time_seconds",
            "gauge",
            "When the daemon started (Unix time).",
            ts(&self.started_at),
        );
        out.single(
            "custos_scheduler_tick_age_seconds",
            "gauge",
            "Time since the scheduler loop last went round; /healthz fails above twice the tick interval.",
            self.tick_age().as_secs_f64(),
        );
        out.single(
            "custos_scheduler_tick_interval_seconds",
            "gauge",
            "The scheduler loop's tick interval.",
            self.tick.as_secs_f64(),
        );
        out.single(
            "custos_tenants",
            "gauge",
            "Tenants with a loaded policy.",
            inner.tenants as f64,
        );
        out.single(
            "custos_jobs_running",
            "gauge",
            "Jobs running now.",
            inner.running as f64,
        );
        out.single(
            "custos_policy_rejected_total",
            "counter",
            "Policy problems refused at start or reload (each a policy.rejected event).",
            inner.policy_rejected as f64,
        );
        out.family(
            "custos_policy_reloads_total",
            "counter",
            "SIGHUP reloads by outcome: applied (all valid), partial (some refused, previous versions kept), failed.",
        );
        for (outcome, n) in &inner.reloads {
            out.sample(
                "custos_policy_reloads_total",
                &[("outcome", outcome)],
                *n as f64,
            );
        }

        let jobs: Vec<(&(TenantId, ScheduledJob), &JobStats)> = inner.jobs.iter().collect();
        out.family(
            "custos_job_runs_total",
            "counter",
            "Scheduled runs by outcome (success, failure, skipped = ran by another daemon, unsupported, contended, abandoned).",
        );
        for (key, s) in &jobs {
            for (outcome, n) in &s.runs {
                let [t, j] = labels(key);
                out.sample(
                    "custos_job_runs_total",
                    &[t, j, ("outcome", outcome)],
                    *n as f64,
                );
            }
        }
        type Field = fn(&JobStats) -> Option<f64>;
        let per_job: [(&str, &str, &str, Field); 9] = [
            (
                "custos_job_failures_total",
                "counter",
                "Scheduled runs that failed (including unsupported, contended and abandoned ones).",
                |s| Some(s.failures as f64),
            ),
            (
                "custos_lease_contended_total",
                "counter",
                "Times the tenant's lease was busy when the job was due (each a lease.contended event).",
                |s| Some(s.contended as f64),
            ),
            (
                "custos_job_last_duration_seconds",
                "gauge",
                "Duration of the last run.",
                |s| s.last_duration,
            ),
            (
                "custos_job_last_run_timestamp_seconds",
                "gauge",
                "When the last run started (Unix time).",
                |s| s.last_run.map(|t| t.timestamp_millis() as f64 / 1000.0),
            ),
            (
                "custos_job_last_success_timestamp_seconds",
                "gauge",
                "When the last successful run finished (Unix time).",
                |s| s.last_success.map(|t| t.timestamp_millis() as f64 / 1000.0),
            ),
            (
                "custos_job_last_run_success",
                "gauge",
                "1 if the last run succeeded, 0 if it failed.",
                |s| {
                    s.last_outcome
                        .filter(|o| *o != RunOutcome::Skipped)
                        .map(|o| if o.is_failure() { 0.0 } else { 1.0 })
                },
            ),
            (
                "custos_job_next_run_timestamp_seconds",
                "gauge",
                "When the next run is planned to start, jitter included (Unix time).",
                |s| s.next_run.map(|t| t.timestamp_millis() as f64 / 1000.0),
            ),
            (
                "custos_job_unsupported",
                "gauge",
                "1 for a job kind the policy schedules but this build cannot run.",
                |s| s.unsupported.then_some(1.0),
            ),
            (
                "custos_job_last_bytes_in",
                "gauge",
                "Bytes the last successful run read (backup: source bytes; check: bytes verified).",
                |s| s.last_bytes_in.map(|v| v as f64),
            ),
        ];
        for (name, kind, help, field) in per_job {
            out.family(name, kind, help);
            for (key, s) in &jobs {
                if let Some(v) = field(s) {
                    out.sample(name, &labels(key), v);
                }
            }
        }
        let extra: [(&str, &str, Field); 2] = [
            (
                "custos_job_last_bytes_stored",
                "Bytes the last successful run stored.",
                |s| s.last_bytes_stored.map(|v| v as f64),
            ),
            (
                "custos_job_last_files",
                "Files the last successful run covered.",
                |s| s.last_files.map(|v| v as f64),
            ),
        ];
        for (name, help, field) in extra {
            out.family(name, "gauge", help);
            for (key, s) in &jobs {
                if let Some(v) = field(s) {
                    out.sample(name, &labels(key), v);
                }
            }
        }

        out.family(
            "custos_key_epoch",
            "gauge",
            "The tenant's current key epoch.",
        );
        for (t, k) in &inner.keys {
            out.sample(
                "custos_key_epoch",
                &[("tenant", t.as_str())],
                k.epoch as f64,
            );
        }
        out.family(
            "custos_key_epoch_age_seconds",
            "gauge",
            "Age of the tenant's current data key (key epoch), as of now.",
        );
        for (t, k) in &inner.keys {
            let age = (now - k.epoch_created_at).num_milliseconds().max(0) as f64 / 1000.0;
            out.sample(
                "custos_key_epoch_age_seconds",
                &[("tenant", t.as_str())],
                age,
            );
        }
        out.family(
            "custos_key_cmk_age_seconds",
            "gauge",
            "Time since custos last rotated the tenant's CMK (or since the tenant was created), as of now.",
        );
        for (t, k) in &inner.keys {
            let age = (now - k.cmk_since).num_milliseconds().max(0) as f64 / 1000.0;
            out.sample(
                "custos_key_cmk_age_seconds",
                &[("tenant", t.as_str()), ("key", &k.key)],
                age,
            );
        }

        out.family(
            "custos_drill_last_rto_met",
            "gauge",
            "1 if the tenant's last drill that restored met its RTO, 0 if it missed it (that drill failed: rto_exceeded).",
        );
        for (t, r) in &inner.rto {
            out.sample(
                "custos_drill_last_rto_met",
                &[("tenant", t.as_str())],
                f64::from(u8::from(r.last_met)),
            );
        }
        out.family(
            "custos_drill_rto_missed_total",
            "counter",
            "Drills whose restore took longer than the tenant's RTO.",
        );
        for (t, r) in &inner.rto {
            out.sample(
                "custos_drill_rto_missed_total",
                &[("tenant", t.as_str())],
                r.missed as f64,
            );
        }
        if let Some(audit) = &inner.audit {
            out.single(
                "custos_audit_write_failures_total",
                "counter",
                "Audit records the log could not write (full disk, I/O error, a log that no longer matches its checkpoints); an action that must be recorded then fails (audit_unavailable).",
                audit.write_failures() as f64,
            );
            out.single(
                "custos_audit_replication_failures_total",
                "counter",
                "Times the audit log could not be copied to the store (the local log has the records; the next append retries).",
                audit.replication_failures() as f64,
            );
        }

        // Job-specific gauges: custos_<job>_<name>{tenant}.
        let mut by_name: BTreeMap<String, Vec<(&TenantId, f64)>> = BTreeMap::new();
        for ((job, name), values) in &inner.gauges {
            let metric = format!("custos_{}_{}", job.as_str(), sanitize(name));
            let list = by_name.entry(metric).or_default();
            list.extend(values.iter().map(|(t, v)| (t, *v)));
        }
        for (metric, values) in by_name {
            out.family(
                &metric,
                "gauge",
                "Job-specific gauge of the last successful run.",
            );
            for (t, v) in values {
                out.sample(&metric, &[("tenant", t.as_str())], v);
            }
        }
        out.text
    }
}

fn labels((t, j): &(TenantId, ScheduledJob)) -> [(&'static str, &str); 2] {
    [("tenant", t.as_str()), ("kind", j.as_str())]
}

/// A metric name part: `[a-zA-Z0-9_]`, anything else becomes '_'.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A label value, escaped as the text format wants (`\\`, `\"`, `\n`).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::Error;
    use crate::daemon::registry::{ForgetPruneReport, ScheduleMeta, Scheduled, ScheduledRotation};
    use crate::jobs::drill::{DrillOutcome, DrillReason};
    use crate::report::{JobMetrics, JobOutput, Outcome};

    #[test]
    fn renders_outcomes_gauges_and_key_ages() {
        let m = Metrics::new(Duration::from_secs(5), "host:1:ab".into(), "shared");
        m.tick();
        let t = TenantId::new("acme").unwrap();
        let now = Utc::now();
        let mut gauges = BTreeMap::new();
        gauges.insert("restore seconds".to_owned(), 12.5);
        m.report(
            ScheduledJob::Drill,
            &JobReport {
                tenant: t.clone(),
                job: JobKind::Drill,
                outcome: Outcome::Success,
                started_at: now,
                finished_at: now,
                duration_ms: 1500,
                metrics: JobMetrics {
                    gauges,
                    ..Default::default()
                },
                error_kind: None,
                error: None,
                result: serde_json::Value::Null,
            },
        );
        m.outcome(&t, ScheduledJob::Rotate, RunOutcome::Unsupported, now);
        m.set_keys(
            &t,
            &KeyInfo {
                key: "local:acme".into(),
                epoch: 3,
                epoch_created_at: now - chrono::Duration::days(2),
                cmk_since: now - chrono::Duration::days(40),
            },
        );
        let text = m.render();
        assert!(
            text.contains(
                "custos_job_runs_total{tenant=\"acme\",kind=\"drill\",outcome=\"success\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("custos_job_failures_total{tenant=\"acme\",kind=\"rotate\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("custos_job_last_duration_seconds{tenant=\"acme\",kind=\"drill\"} 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("custos_drill_restore_seconds{tenant=\"acme\"} 12.5\n"),
            "{text}"
        );
        assert!(
            text.contains("custos_key_epoch{tenant=\"acme\"} 3\n"),
            "{text}"
        );
        let age = text
            .lines()
            .find(|l| l.starts_with("custos_key_epoch_age_seconds{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((172_799.0..172_900.0).contains(&age), "{age}");
        // Every sample line belongs to a family declared just before (no interleaving).
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    declared.insert(rest.split(' ').next().unwrap().to_owned()),
                    "{line}"
                );
            }
        }
        assert!(m.healthy());
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The job report the runner writes for a scheduled job's output.
    fn scheduled_report<T: JobOutput + serde::Serialize>(
        tenant: &TenantId,
        job: ScheduledJob,
        output: T,
    ) -> JobReport {
        let now = Utc::now();
        let (error_kind, error) = output.failure().unzip();
        let metrics = output.metrics();
        let output = Scheduled {
            output,
            scheduled: ScheduleMeta {
                slot: now,
                holder: "h".into(),
                read_data: None,
            },
        };
        JobReport {
            tenant: tenant.clone(),
            job: job.kind(),
            outcome: match error_kind {
                None => Outcome::Success,
                Some(_) => Outcome::Failure,
            },
            started_at: now,
            finished_at: now,
            duration_ms: 10,
            metrics,
            error_kind,
            error,
            result: serde_json::to_value(&output).unwrap(),
        }
    }

    /// A drill of `tenant` that restored in `restore` seconds under an RTO of
    /// `rto` seconds; passed unless the restore took longer.
    fn drill(tenant: &TenantId, restore: Option<f64>, rto: f64) -> DrillReport {
        let stopped = Error::NotFound {
            what: "snapshot latest".into(),
        };
        let mut d = DrillReport::stopped_by(tenant, &stopped);
        d.rto_seconds = Some(rto);
        if let Some(restore) = restore {
            d.restore_seconds = Some(restore);
            d.rto_met = Some(restore <= rto);
            d.verify_seconds = Some(1.0);
            if restore <= rto {
                d.outcome = DrillOutcome::Passed;
                d.reason = None;
            } else {
                d.reason = Some(DrillReason::RtoExceeded);
            }
        }
        d
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_missed_rto_is_exported_though_the_drill_failed() {
        let m = Metrics::new(Duration::from_secs(5), "h".into(), "shared");
        let t = TenantId::new("acme").unwrap();
        let met = "custos_drill_last_rto_met{tenant=\"acme\"}";
        let missed = "custos_drill_rto_missed_total{tenant=\"acme\"}";

        m.report(
            ScheduledJob::Drill,
            &scheduled_report(&t, ScheduledJob::Drill, drill(&t, Some(100.0), 900.0)),
        );
        let text = m.render();
        assert_eq!(sample(&text, met), Some(1.0), "{text}");
        assert_eq!(sample(&text, missed), Some(0.0), "{text}");

        // Over the RTO: the drill fails (rto_exceeded), and says why in the metrics.
        let slow = scheduled_report(&t, ScheduledJob::Drill, drill(&t, Some(1000.0), 900.0));
        assert_eq!(slow.outcome, Outcome::Failure);
        assert_eq!(slow.error_kind, Some("rto_exceeded"));
        m.report(ScheduledJob::Drill, &slow);
        let text = m.render();
        assert_eq!(sample(&text, met), Some(0.0), "{text}");
        assert_eq!(sample(&text, missed), Some(1.0), "{text}");
        // The restore-time gauges stay those of the last passed drill.
        assert_eq!(
            sample(&text, "custos_drill_restore_seconds{tenant=\"acme\"}"),
            Some(100.0),
            "{text}"
        );

        // A drill that restored nothing has no RTO verdict: the last one stands.
        m.report(
            ScheduledJob::Drill,
            &scheduled_report(&t, ScheduledJob::Drill, drill(&t, None, 900.0)),
        );
        let text = m.render();
        assert_eq!(sample(&text, met), Some(0.0), "{text}");
        assert_eq!(sample(&text, missed), Some(1.0), "{text}");

        m.report(
            ScheduledJob::Drill,
            &scheduled_report(&t, ScheduledJob::Drill, drill(&t, Some(10.0), 900.0)),
        );
        let text = m.render();
        assert_eq!(sample(&text, met), Some(1.0), "{text}");
        assert_eq!(sample(&text, missed), Some(1.0), "{text}");

        m.remove_tenant(&t);
        assert!(!m.render().contains("custos_drill_last_rto_met{"));
    }

    #[tokio::test]
    async fn audit_write_and_replication_failures_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store_root = dir.path().join("store");
        let store = crate::store::local::open(&store_root).unwrap();
        let key = crate::audit::AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
        let log = crate::audit::AuditLog::open_with(
            &dir.path().join("audit"),
            key,
            Some(store),
            Some(&store_root),
        )
        .unwrap();
        let m = Metrics::new(Duration::from_secs(5), "h".into(), "shared");
        assert!(!m.render().contains("custos_audit_"));
        // Watched through a clone: every clone of the log counts into the same place.
        m.watch_audit(log.clone().health());
        let writes = "custos_audit_write_failures_total";
        let replication = "custos_audit_replication_failures_total";
        let details = || serde_json::json!({ "change": "added" });

        log.append("policy.change", None, "daemon:h", details())
            .await
            .unwrap();
        let text = m.render();
        assert_eq!(sample(&text, writes), Some(0.0), "{text}");
        assert_eq!(sample(&text, replication), Some(0.0), "{text}");

        // The store copy cannot be written (its root is now a file): the
        // append succeeds locally, the replication failure is counted.
        std::fs::rename(&store_root, dir.path().join("store.moved")).unwrap();
        std::fs::write(&store_root, b"not a directory").unwrap();
        log.append("policy.change", None, "daemon:h", details())
            .await
            .unwrap();
        assert!(log.replicate().await.is_err());
        let text = m.render();
        assert_eq!(sample(&text, writes), Some(0.0), "{text}");
        assert_eq!(sample(&text, replication), Some(2.0), "{text}");

        // The log itself cannot be written (a directory at its name).
        std::fs::remove_file(log.log_path()).unwrap();
        std::fs::create_dir(log.log_path()).unwrap();
        assert!(
            log.append("policy.change", None, "daemon:h", details())
                .await
                .is_err()
        );
        // A malformed record is the caller's bug, not a write failure.
        assert!(
            log.append("Bad Event", None, "daemon:h", details())
                .await
                .is_err()
        );
        let text = m.render();
        assert_eq!(sample(&text, writes), Some(1.0), "{text}");
    }

    /// Every family the daemon can export, with a report of every job kind
    /// (the job-specific gauges from the jobs' own outputs) and every event.
    fn everything() -> String {
        let m = Metrics::new(Duration::from_secs(5), "h".into(), "shared");
        m.tick();
        let t = TenantId::new("acme").unwrap();
        let now = Utc::now();
        m.set_tenants(1);
        m.set_running(1);
        m.policy_rejected(1);
        m.reloaded("applied");
        m.watch_audit(Arc::default());
        m.set_keys(
            &t,
            &KeyInfo {
                key: "local:acme".into(),
                epoch: 1,
                epoch_created_at: now,
                cmk_since: now,
            },
        );
        for job in ScheduledJob::ALL {
            m.set_next(&t, job, Some(now));
            m.contended(&t, job);
            m.outcome(&t, job, RunOutcome::Failure, now);
            m.report(
                job,
                &JobReport {
                    tenant: t.clone(),
                    job: job.kind(),
                    outcome: Outcome::Success,
                    started_at: now,
                    finished_at: now,
                    duration_ms: 10,
                    metrics: JobMetrics {
                        bytes_in: Some(1),
                        bytes_stored: Some(1),
                        files: Some(1),
                        ..Default::default()
                    },
                    error_kind: None,
                    error: None,
                    result: serde_json::Value::Null,
                },
            );
        }
        m.set_unsupported(&t, ScheduledJob::Shred);
        let mut passed = drill(&t, Some(1.0), 900.0);
        passed.verify_command = Some(crate::jobs::drill::VerifyCommandResult {
            argv: vec!["true".into()],
            passed: true,
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            timeout_seconds: 60.0,
            not_run: None,
            expect_stdout: None,
            stdout_matched: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            duration_seconds: 1.0,
        });
        let reports = [
            scheduled_report(&t, ScheduledJob::Drill, passed),
            scheduled_report(&t, ScheduledJob::Drill, drill(&t, Some(1000.0), 900.0)),
            scheduled_report(
                &t,
                ScheduledJob::Forget,
                ForgetPruneReport {
                    forget: crate::jobs::forget::ForgetReport {
                        decisions: Vec::new(),
                        kept: 1,
                        removed: 1,
                        deferred: None,
                        dry_run: false,
                    },
                    prune: Some(crate::jobs::prune::PruneReport::default()),
                },
            ),
            scheduled_report(
                &t,
                ScheduledJob::Rotate,
                ScheduledRotation {
                    rotations: Vec::new(),
                },
            ),
            scheduled_report(
                &t,
                ScheduledJob::Shred,
                crate::jobs::shred::ShredReport {
                    tenant: t.clone(),
                    epoch: None,
                    certificate_id: "c".into(),
                    certificate_path: "certificates/acme/c.json".into(),
                    already_done: false,
                    resumed_after: None,
                    guarantee: crate::jobs::shred::GuaranteeKind::KeysDestroyed,
                    irreversible_at: None,
                    keys: Vec::new(),
                    rewrapped_to: None,
                    objects_deleted: 1,
                    objects_retained: 0,
                    certificate: serde_json::Value::Null,
                    certificate_bytes: Vec::new(),
                },
            ),
        ];
        for r in &reports {
            let job = ScheduledJob::ALL
                .into_iter()
                .find(|j| j.kind() == r.job)
                .unwrap();
            m.report(job, r);
        }
        m.render()
    }

    /// The `custos_…` names a text mentions.
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for (at, _) in text.match_indices("custos_") {
            if text[..at].chars().next_back().is_some_and(ident) {
                continue;
            }
            let end = text[at..]
                .find(|c| !ident(c))
                .map_or(text.len(), |n| at + n);
            names.insert(text[at..end].to_owned());
        }
        names
    }

    #[test]
    fn the_alerts_and_the_dashboard_name_only_exported_metrics() {
        let text = everything();
        let families: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect();
        for family in [
            "custos_drill_restore_seconds",
            "custos_drill_verify_command_seconds",
            "custos_forget_bytes_freed",
            "custos_rotate_rotations",
            "custos_shred_keys_destroyed",
            "custos_audit_write_failures_total",
            "custos_drill_rto_missed_total",
        ] {
            assert!(families.contains(family), "{family} missing from:\n{text}");
        }
        let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
        let read = |p: &str| std::fs::read_to_string(contrib.join(p)).unwrap();
        let dashboard = read("grafana/custos.json");
        let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
        for file in [
            "prometheus/alerts.yml",
            "prometheus/alerts_test.yml",
            "grafana/custos.json",
        ] {
            let unknown: Vec<String> = names_in(&read(file))
                .into_iter()
                .filter(|n| !families.contains(n))
                .collect();
            assert!(
                unknown.is_empty(),
                "{file} names metrics the daemon does not export: {unknown:?}"
            );
        }
        // A panel for every family.
        let shown = names_in(&dashboard);
        let missing: Vec<&String> = families.iter().filter(|f| !shown.contains(*f)).collect();
        assert!(missing.is_empty(), "no dashboard panel shows {missing:?}");
        // The job kind is `kind`: a `job` label would clash with the scrape job's.
        assert!(
            !text.contains(",job=\"") && !text.contains("{job=\""),
            "{text}"
        );
        assert!(text.contains(",kind=\"backup\""), "{text}");
    }

    #[test]
    fn health_fails_when_ticks_stop() {
        let m = Metrics::new(Duration::from_millis(20), "h".into(), "shared");
        m.tick();
        assert!(m.healthy());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!m.healthy());
        m.tick();
        assert!(m.healthy());
    }
}

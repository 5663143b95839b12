//! The scheduled compliance report (`[report] schedule`): one timer for the
//! installation beside the tenants' jobs. A report covers every tenant and
//! writes nothing to the store, so it takes no lease and leaves no slot
//! mark: each daemon writes its own into its `output_dir`. Slots and
//! catch-up follow the jobs' rules ([`plan::next_slot`]): a report that
//! never ran is due at once, missed slots are made up once.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::task::{JoinError, JoinHandle};

use super::plan::{self, When};
use super::state::RunOutcome;
use crate::config::{Config, Schedule};
use crate::context::Context;
use crate::report::compliance::{self, model::Verdict};

/// When the report is next due.
#[derive(Debug, Clone)]
pub struct ReportTimer {
    when: When,
    next: Option<DateTime<Utc>>,
    /// `--once`: the slot due at start runs, none after it.
    once: bool,
}

impl ReportTimer {
    /// `last`: the slot that last ran (the daemon's state), if any.
    pub fn new(
        schedule: &Schedule,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        once: bool,
    ) -> Self {
        let when = When::Cron(schedule.clone());
        let next = plan::next_slot(&when, last, now)
            .filter(|n| !once || n.slot <= now)
            .map(|n| n.slot);
        ReportTimer { when, next, once }
    }

    /// The slot due at `now`, if one is.
    pub fn due(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next.filter(|slot| *slot <= now)
    }

    /// When the next slot is due (`None`: running, or nothing planned).
    pub fn next_at(&self) -> Option<DateTime<Utc>> {
        self.next
    }

    /// The slot starts: nothing is due until it has run.
    pub fn started(&mut self) {
        self.next = None;
    }

    /// `slot` ran: plans the next one.
    pub fn ran(&mut self, slot: DateTime<Utc>, now: DateTime<Utc>) {
        self.next = if self.once {
            None
        } else {
            plan::next_slot(&self.when, Some(slot), now).map(|n| n.slot)
        };
    }
}

/// What one scheduled report did (`daemon --once` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct ReportRun {
    pub slot: DateTime<Utc>,
    /// `success`: written, from an audit log that verified; `failure`: not
    /// written, or written from a log that did not verify.
    pub outcome: RunOutcome,
    pub files: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    pub detail: String,
}

/// A running report and its slot.
pub type Running = Option<(DateTime<Utc>, JoinHandle<ReportRun>)>;

/// Resolves when the running report ends; never without one (a disabled
/// `select!` branch still builds its future).
pub async fn finished(task: &mut Running) -> (DateTime<Utc>, Result<ReportRun, JoinError>) {
    match task {
        Some((slot, handle)) => (*slot, handle.await),
        None => std::future::pending().await,
    }
}

/// Makes and writes the report of `slot` (events `report.written`, `report.failed`).
pub async fn run(config: Config, ctx: Context, slot: DateTime<Utc>) -> ReportRun {
    let now = crate::hooks::now();
    match compliance::write_scheduled(&config, &ctx, now).await {
        Ok((report, files)) => {
            let s = &report.summary;
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            let detail = report.one_line();
            if s.audit_verified {
                tracing::info!(
                    event = "report.written",
                    slot = %slot.to_rfc3339(),
                    files = %names.join(","),
                    verdict = s.verdict.as_str(),
                    controls_failed = s.failed,
                    tenants = s.tenants,
                    audit_verified = true,
                    "compliance report written: {detail}"
                );
            } else {
                tracing::error!(
                    event = "report.written",
                    slot = %slot.to_rfc3339(),
                    files = %names.join(","),
                    verdict = s.verdict.as_str(),
                    controls_failed = s.failed,
                    tenants = s.tenants,
                    audit_verified = false,
                    "compliance report written from an audit log that did not verify: {detail}"
                );
            }
            ReportRun {
                slot,
                outcome: if s.audit_verified {
                    RunOutcome::Success
                } else {
                    RunOutcome::Failure
                },
                files,
                verdict: Some(s.verdict),
                detail,
            }
        }
        Err(e) => {
            tracing::error!(
                event = "report.failed",
                slot = %slot.to_rfc3339(),
                error_kind = %e.kind(),
                error = %e,
                "compliance report not written: {e}"
            );
            ReportRun {
                slot,
                outcome: RunOutcome::Failure,
                files: Vec::new(),
                verdict: None,
                detail: e.to_string(),
            }
        }
    }
}

/// The run of a report task that panicked (a bug) or was aborted.
pub fn lost(slot: DateTime<Utc>, e: &JoinError) -> ReportRun {
    tracing::error!(event = "report.failed", slot = %slot.to_rfc3339(), error_kind = "internal", "compliance report task ended: {e}");
    ReportRun {
        slot,
        outcome: RunOutcome::Failure,
        files: Vec::new(),
        verdict: None,
        detail: format!("the report task ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn slots_catch_up_once_and_then_follow_the_schedule() {
        let weekly = Schedule::parse("0 6 * * 1").unwrap();
        // Wednesday 2026-03-04: never ran, so Monday's slot is due now.
        let now = t("2026-03-04T12:00:00Z");
        let mut timer = ReportTimer::new(&weekly, None, now, false);
        assert_eq!(timer.due(now), Some(t("2026-03-02T06:00:00Z")));
        timer.started();
        assert_eq!((timer.due(now), timer.next_at()), (None, None));
        timer.ran(t("2026-03-02T06:00:00Z"), now);
        assert_eq!(timer.due(now), None);
        assert_eq!(timer.next_at(), Some(t("2026-03-09T06:00:00Z")));
        // Ran last Monday: nothing due until next Monday.
        let timer = ReportTimer::new(&weekly, Some(t("2026-03-02T06:00:00Z")), now, false);
        assert_eq!(timer.due(now), None);
        // --once runs what is due at start and nothing later.
        let mut once = ReportTimer::new(&weekly, None, now, true);
        assert!(once.due(now).is_some());
        once.ran(t("2026-03-02T06:00:00Z"), now);
        assert_eq!(once.next_at(), None);
        let idle = ReportTimer::new(&weekly, Some(t("2026-03-02T06:00:00Z")), now, true);
        assert_eq!(idle.next_at(), None);
    }
}

//! When the deletion policy makes a shred due: the daemon asks [`decide`]
//! (or [`daemon_decision`], with a descriptor it already has) for every
//! tenant on each tick and runs [`super::run_job`] with
//! [`super::ShredRequest::from_policy`] when the answer
//! [`ShredDecision::should_run`]: [`ShredDecision::Due`] or [`ShredDecision::Resume`].

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{DeletionPolicy, DeletionState};
use crate::format::descriptor::{Descriptor, Lifecycle};
use crate::tenant::TenantId;

/// The answer of [`due`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ShredDecision {
    /// Offboarding, grace period over, no legal hold: shred now.
    Due,
    /// A shred began and did not finish (the tenant is fenced): finish it,
    /// whatever the policy says now (legal hold excepted).
    Resume,
    /// Offboarding, but the grace period runs until `at`.
    NotYet { at: DateTime<Utc> },
    /// A legal hold blocks shredding (even an interrupted one: the tenant
    /// stays fenced, and nothing more is destroyed until the hold is lifted).
    LegalHold,
    /// The policy does not ask for deletion (`deletion.state = "active"`, or
    /// offboarding without a `requested_at`, which validation refuses).
    NotOffboarding,
    /// Already shredded: nothing to do.
    Shredded { at: Option<DateTime<Utc>> },
}

impl ShredDecision {
    /// Whether the daemon should run the shred job now.
    pub fn should_run(&self) -> bool {
        matches!(self, ShredDecision::Due | ShredDecision::Resume)
    }
}

/// Whether `policy` makes a shred of the tenant due at `now`. `descriptor` is
/// the tenant's descriptor when it has one (`None`: not initialised, so only
/// the policy decides). Pure: no I/O, no logging.
pub fn due(
    policy: &DeletionPolicy,
    descriptor: Option<&Descriptor>,
    now: DateTime<Utc>,
) -> ShredDecision {
    match descriptor.map(|d| d.state) {
        Some(Lifecycle::Shredded) => {
            let at = descriptor
                .and_then(|d| d.shredding.as_ref())
                .and_then(|s| s.finished_at);
            return ShredDecision::Shredded { at };
        }
        _ if policy.legal_hold => return ShredDecision::LegalHold,
        Some(Lifecycle::Shredding) => return ShredDecision::Resume,
        _ => {}
    }
    if policy.state != DeletionState::Offboarding {
        return ShredDecision::NotOffboarding;
    }
    match policy.shred_due_at() {
        None => ShredDecision::NotOffboarding,
        Some(at) if now < at => ShredDecision::NotYet { at },
        Some(_) => ShredDecision::Due,
    }
}

/// [`due`] for the daemon, which logs what it decided: a shred that would be
/// due but for a legal hold is logged as `shred.refused` with
/// `reason = "legal_hold"` (a warning, every time the daemon asks), a due or
/// resumed shred as `shred.due`, a pending one at debug level.
pub fn daemon_decision(
    tenant: &TenantId,
    policy: &DeletionPolicy,
    descriptor: Option<&Descriptor>,
    now: DateTime<Utc>,
) -> ShredDecision {
    let decision = due(policy, descriptor, now);
    match &decision {
        ShredDecision::LegalHold => {
            let would_be_due = policy.state == DeletionState::Offboarding
                && policy.requested_at.is_some_and(|r| {
                    chrono::Duration::from_std(policy.grace)
                        .ok()
                        .and_then(|g| r.checked_add_signed(g))
                        .is_some_and(|at| at <= now)
                });
            let fenced = descriptor.is_some_and(|d| d.state == Lifecycle::Shredding);
            if would_be_due || fenced {
                tracing::warn!(
                    event = crate::audit::event::SHRED_REFUSED,
                    tenant = %tenant,
                    reason = "legal_hold",
                    offboarding = policy.state == DeletionState::Offboarding,
                    requested_at = policy.requested_at.map(|t| t.to_rfc3339()),
                    interrupted_shred = fenced,
                    "shred of {tenant} refused: the tenant is under legal hold"
                );
            } else {
                tracing::debug!(event = "shred.not_due", tenant = %tenant, reason = "legal_hold", "tenant under legal hold");
            }
        }
        ShredDecision::Due | ShredDecision::Resume => {
            tracing::info!(
                event = "shred.due",
                tenant = %tenant,
                resume = matches!(decision, ShredDecision::Resume),
                "shred of {tenant} is due"
            );
        }
        ShredDecision::NotYet { at } => {
            tracing::debug!(event = "shred.not_due", tenant = %tenant, due_at = %at.to_rfc3339(), "shred not yet due");
        }
        ShredDecision::NotOffboarding | ShredDecision::Shredded { .. } => {}
    }
    decision
}

/// [`daemon_decision`] for a tenant's policy, reading the tenant's descriptor
/// from the store first (a tenant not initialised yet has none).
pub async fn decide(
    ctx: &crate::context::Context,
    policy: &crate::config::Policy,
    now: DateTime<Utc>,
) -> crate::Result<ShredDecision> {
    let descriptor = match crate::repo::Repo::open(ctx, &policy.tenant, None).await {
        Ok(repo) => Some(repo.descriptor().clone()),
        Err(crate::Error::TenantNotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    Ok(daemon_decision(
        &policy.tenant,
        &policy.deletion,
        descriptor.as_ref(),
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRef;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn offboarding(hold: bool) -> DeletionPolicy {
        DeletionPolicy {
            state: DeletionState::Offboarding,
            requested_at: Some(t("2026-01-01T00:00:00Z")),
            grace: Duration::from_secs(30 * 86_400),
            legal_hold: hold,
            kms_pending_window_days: 7,
        }
    }

    fn descriptor(state: Lifecycle) -> Descriptor {
        let mut d = Descriptor::new(
            TenantId::new("acme").unwrap(),
            KeyRef::local("acme").unwrap(),
            t("2025-01-01T00:00:00Z"),
        );
        d.state = state;
        d
    }

    #[test]
    fn decisions() {
        let before = t("2026-01-30T23:59:59Z");
        let after = t("2026-01-31T00:00:00Z");
        let active = descriptor(Lifecycle::Active);
        let p = offboarding(false);
        assert_eq!(
            due(&p, Some(&active), before),
            ShredDecision::NotYet { at: after }
        );
        assert_eq!(due(&p, Some(&active), after), ShredDecision::Due);
        assert_eq!(due(&p, None, after), ShredDecision::Due);
        assert_eq!(
            due(&offboarding(true), Some(&active), after),
            ShredDecision::LegalHold
        );
        assert_eq!(
            due(&DeletionPolicy::default(), Some(&active), after),
            ShredDecision::NotOffboarding
        );
        // An interrupted shred is resumed even if the policy changed back…
        let fenced = descriptor(Lifecycle::Shredding);
        assert_eq!(
            due(&DeletionPolicy::default(), Some(&fenced), before),
            ShredDecision::Resume
        );
        // …but not under a legal hold.
        assert_eq!(
            due(&offboarding(true), Some(&fenced), after),
            ShredDecision::LegalHold
        );
        let done = descriptor(Lifecycle::Shredded);
        assert!(matches!(
            due(&offboarding(true), Some(&done), after),
            ShredDecision::Shredded { .. }
        ));
        assert!(ShredDecision::Due.should_run() && ShredDecision::Resume.should_run());
        assert!(!ShredDecision::LegalHold.should_run());
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_daemon_logs_a_legal_hold_refusal() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let tenant = TenantId::new("acme").unwrap();
        let active = descriptor(Lifecycle::Active);
        let decision = tracing::subscriber::with_default(subscriber, || {
            daemon_decision(
                &tenant,
                &offboarding(true),
                Some(&active),
                t("2026-03-01T00:00:00Z"),
            )
        });
        assert_eq!(decision, ShredDecision::LegalHold);
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let refused: Vec<_> = events
            .iter()
            .filter(|e| e["event"] == "shred.refused")
            .collect();
        assert_eq!(refused.len(), 1, "{out}");
        assert_eq!(refused[0]["reason"], "legal_hold");
        assert_eq!(refused[0]["tenant"], "acme");
        assert_eq!(refused[0]["level"], "WARN");
    }
}

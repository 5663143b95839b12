//! `custos rotate`: CMK rotation, CMK replacement and key-epoch roll.
//!
//! Rotation touches key envelopes (`tenants/<t>/keys/<epoch>`) and the
//! descriptor only: no pack, index or snapshot is rewritten, so its cost grows
//! with the number of epochs, never with the amount of data.
//!
//! Crash safety: every step writes the new state before the old one stops
//! being usable, and every step is idempotent, so re-running the same command
//! after a crash finishes the job.
//!
//! - `--cmk`: the provider makes new backing-key material (AWS
//!   `RotateKeyOnDemand`, local: a new key version); the descriptor records
//!   `cmk_rotated_at`; then each envelope is re-wrapped under the key's newest
//!   material (AWS `ReEncrypt` to the same key). An envelope whose
//!   `rewrapped_at` predates `cmk_rotated_at` is what a re-run still has to do,
//!   so a re-run after a crash does not rotate the key again.
//! - `--replace-cmk NEW`: `pending_key = NEW` is written first; envelopes move
//!   one by one (each is replaced atomically, after its new wrap was unwrapped
//!   and checked); then `key = NEW`, `previous_keys += old`, `pending_key = None`.
//!   At every point each envelope unwraps under the old or the new key, both live.
//! - `--new-epoch`: the envelope of epoch n+1 is created (create-only and
//!   resumable), then the descriptor names it current and retires epoch n.
//!
//! After writing, every envelope is read back and unwrapped (and its data key
//! checked against the envelope's fingerprint) before the rotation reports success.
//!
//! A rotation is a [`RotatePlan`] ([`plan`]: every check, no write) carried
//! out by [`execute`]; `--dry-run` prints the plan ([`preview`]).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::RotationPolicy;
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, EpochRecord, EpochState, Lifecycle};
use crate::format::shred::ShredStep;
use crate::keys::{Destruction, KeyError, KeyInfo, KeyRef};
use crate::repo::Repo;
use crate::repo::ownership;
use crate::store::lease::LeaseGuard;

mod envelopes;
mod execute;
mod plan;

pub use plan::{RotatePlan, Step};

/// What to rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RotateAction {
    /// New backing-key material in the provider, then every envelope re-wrapped.
    Cmk,
    /// Every envelope moved under a new customer-supplied key.
    ReplaceCmk {
        new_key: KeyRef,
        /// Schedule the old key's deletion after this many days once the move
        /// is verified (AWS: 7–30; the local provider destroys at once).
        schedule_old_key_deletion: Option<u32>,
    },
    /// A new data key (epoch) for new data; dedup starts afresh in it.
    NewEpoch,
    /// Finishes an interrupted `ReplaceCmk` to `new_key` and nothing more
    /// (what the daemon runs for a descriptor's `pending_key`). The pending key
    /// comes from the store, so it is followed only while it is proven the
    /// tenant's (its key claim); this never starts a move.
    FinishReplace { new_key: KeyRef },
}

impl RotateAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            RotateAction::Cmk => "cmk",
            RotateAction::ReplaceCmk { .. } | RotateAction::FinishReplace { .. } => "replace_cmk",
            RotateAction::NewEpoch => "new_epoch",
        }
    }
}

/// One envelope's part in a rotation.
#[derive(Debug, Clone, Serialize)]
pub struct EnvelopeChange {
    pub epoch: u32,
    pub key_before: KeyRef,
    pub key_after: KeyRef,
    /// Backing-key version before and after, where the provider exposes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_after: Option<String>,
    /// 0 when the envelope was already done (re-run) or in a dry run.
    pub bytes_written: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RotateReport {
    pub tenant: String,
    pub action: &'static str,
    pub dry_run: bool,
    /// A previous, interrupted run of the same rotation was finished.
    pub resumed: bool,
    pub key_before: KeyRef,
    pub key_after: KeyRef,
    /// Provider's current backing-key version before and after (local provider; AWS does not expose it).
    pub key_version_before: Option<String>,
    pub key_version_after: Option<String>,
    pub epoch_before: u32,
    pub epoch_after: u32,
    pub envelopes: Vec<EnvelopeChange>,
    pub envelopes_rewrapped: usize,
    /// Envelopes read back and unwrapped after the rotation (all of them).
    pub envelopes_verified: usize,
    /// Every byte the rotation wrote to the store: envelopes, descriptor and
    /// key claims (a new key's, or a claim recorded for a tenant made before
    /// claims existed).
    pub bytes_written: u64,
    pub objects_written: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_key_deletion: Option<Destruction>,
    /// The plan's steps: carried out, or in a dry run what would be.
    pub steps: Vec<Step>,
    pub duration_ms: u64,
}

impl RotateReport {
    /// A report of `action` on the tenant of `d` before anything is done.
    fn new(d: &Descriptor, action: &'static str) -> Self {
        RotateReport {
            tenant: d.tenant.to_string(),
            action,
            dry_run: false,
            resumed: false,
            key_before: d.key.clone(),
            key_after: d.key.clone(),
            key_version_before: None,
            key_version_after: None,
            epoch_before: d.current_epoch,
            epoch_after: d.current_epoch,
            envelopes: Vec::new(),
            envelopes_rewrapped: 0,
            envelopes_verified: 0,
            bytes_written: 0,
            objects_written: 0,
            old_key_deletion: None,
            steps: Vec::new(),
            duration_ms: 0,
        }
    }
}

impl RotateReport {
    /// One rotation as the audit log keeps it (see [`crate::report::JobOutput::audit_result`]).
    pub fn audit_entry(&self) -> serde_json::Value {
        serde_json::json!({
            "action": self.action,
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            "key_before": self.key_before,
            "key_after": self.key_after,
            "key_version_before": self.key_version_before,
            "key_version_after": self.key_version_after,
            "epoch_before": self.epoch_before,
            "epoch_after": self.epoch_after,
            "envelopes_rewrapped": self.envelopes_rewrapped,
            "envelopes_verified": self.envelopes_verified,
        })
    }
}

impl crate::report::JobOutput for RotateReport {
    /// `{"rotations": [ … ]}`, the shape a scheduled run (several rotations) has too.
    fn audit_result(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "rotations": [self.audit_entry()] }))
    }

    fn metrics(&self) -> crate::report::JobMetrics {
        let mut gauges = std::collections::BTreeMap::new();
        gauges.insert(
            "envelopes_rewrapped".to_owned(),
            self.envelopes_rewrapped as f64,
        );
        gauges.insert("bytes_written".to_owned(), self.bytes_written as f64);
        crate::report::JobMetrics {
            bytes_stored: Some(self.bytes_written),
            gauges,
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------
// What is due
// ---------------------------------------------------------------------------

/// One key of a tenant, for `tenant show`.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub key: KeyRef,
    /// "current", "pending" (a move to it is in progress) or "previous".
    pub role: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochStatus {
    pub epoch: u32,
    pub state: EpochState,
    pub current: bool,
    pub created_at: DateTime<Utc>,
    pub age_days: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<DateTime<Utc>>,
}

/// A tenant's keys and epochs, their ages, and when each rotation is next due.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    pub keys: Vec<KeyStatus>,
    /// When the current CMK last got new material or replaced the previous one
    /// (the tenant's creation if never).
    pub cmk_since: DateTime<Utc>,
    pub cmk_age_days: i64,
    /// `rotation.cmk_every`, as written in policies ("90d").
    pub cmk_every: Option<String>,
    pub cmk_next_due: Option<DateTime<Utc>>,
    pub cmk_due: bool,
    pub current_epoch: u32,
    pub epoch_since: DateTime<Utc>,
    pub epoch_age_days: i64,
    pub epoch_every: Option<String>,
    pub epoch_next_due: Option<DateTime<Utc>>,
    pub epoch_due: bool,
    /// A `--replace-cmk` was interrupted: running it again (or [`due`]) finishes it.
    pub move_pending: Option<KeyRef>,
    pub epochs: Vec<EpochStatus>,
}

/// `t + d`, or None when that is past the last time chrono can hold: never
/// due. Checked because `t` comes from the descriptor in the store, which
/// whoever can write the store may set to any date.
fn plus(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    t.checked_add_signed(chrono::Duration::from_std(d).ok()?)
}

/// Ages and due dates of a tenant's CMK and current epoch under `policy`.
/// Pure: the daemon calls it on every tick, `tenant show` prints it.
pub fn rotation_status(
    d: &Descriptor,
    policy: &RotationPolicy,
    now: DateTime<Utc>,
) -> RotationStatus {
    let mut keys = vec![KeyStatus {
        key: d.key.clone(),
        role: "current",
    }];
    if let Some(p) = &d.pending_key {
        keys.push(KeyStatus {
            key: p.clone(),
            role: "pending",
        });
    }
    for k in d.previous_keys.iter().rev() {
        keys.push(KeyStatus {
            key: k.clone(),
            role: "previous",
        });
    }
    let cmk_since = d.cmk_rotated_at.unwrap_or(d.created_at);
    let cmk_next_due = policy.cmk_every.and_then(|e| plus(cmk_since, e));
    let current = d.epoch(d.current_epoch);
    let epoch_since = current.map(|e| e.created_at).unwrap_or(d.created_at);
    let epoch_next_due = policy.epoch_every.and_then(|e| plus(epoch_since, e));
    let active = d.state == Lifecycle::Active;
    RotationStatus {
        keys,
        cmk_since,
        cmk_age_days: (now - cmk_since).num_days(),
        cmk_every: policy.cmk_every.map(crate::config::units::format_duration),
        cmk_next_due,
        cmk_due: active && cmk_next_due.is_some_and(|t| t <= now),
        current_epoch: d.current_epoch,
        epoch_since,
        epoch_age_days: (now - epoch_since).num_days(),
        epoch_every: policy
            .epoch_every
            .map(crate::config::units::format_duration),
        epoch_next_due,
        epoch_due: active && epoch_next_due.is_some_and(|t| t <= now),
        move_pending: d.pending_key.clone(),
        epochs: d
            .epochs
            .iter()
            .map(|e: &EpochRecord| EpochStatus {
                epoch: e.epoch,
                state: e.state,
                current: e.epoch == d.current_epoch,
                created_at: e.created_at,
                age_days: (now - e.created_at).num_days(),
                retired_at: e.retired_at,
            })
            .collect(),
    }
}

/// The rotations due now, in the order to run them: an interrupted
/// `--replace-cmk` first (it must finish before anything else rotates), then
/// the CMK, then the epoch. Empty when nothing is due or the tenant is not active.
pub fn due(d: &Descriptor, policy: &RotationPolicy, now: DateTime<Utc>) -> Vec<RotateAction> {
    if d.state != Lifecycle::Active {
        return Vec::new();
    }
    if let Some(p) = &d.pending_key {
        return vec![RotateAction::FinishReplace { new_key: p.clone() }];
    }
    let s = rotation_status(d, policy, now);
    let mut out = Vec::new();
    if s.cmk_due {
        out.push(RotateAction::Cmk);
    }
    if s.epoch_due {
        out.push(RotateAction::NewEpoch);
    }
    out
}

/// The policy-key check for `rotate --replace-cmk NEW`: the policy may name the
/// tenant's key, the key a move is going to, or NEW (the operator updated the
/// policy before or after the move); anything else is refused.
pub fn check_policy_for_replace(
    d: &Descriptor,
    policy_key: &KeyRef,
    new_key: &KeyRef,
) -> Result<()> {
    let ok = &d.key == policy_key
        || d.pending_key.as_ref() == Some(policy_key)
        || policy_key == new_key
        || (&d.key == new_key && d.previous_keys.contains(policy_key));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "tenant {} is under key {}, its policy names {policy_key}, and --replace-cmk names {new_key}: \
             the policy must name the current key or the new one",
            d.tenant, d.key
        )))
    }
}

// ---------------------------------------------------------------------------
// Running a rotation
// ---------------------------------------------------------------------------

/// Runs one rotation of the tenant `repo` was opened for, under its `lease`:
/// settles what an interrupted run left, plans, executes. `repo` is re-read
/// internally (the rotation updates the descriptor), so callers pass what
/// [`crate::jobs::runner::run_job`] gives them.
pub async fn run(repo: &Repo, lease: &LeaseGuard, action: &RotateAction) -> Result<RotateReport> {
    let started = Instant::now();
    repo.require_active("rotation")?;
    // A fresh handle of our own: updating the descriptor needs `&mut Repo`.
    let mut fresh = Repo::open(repo.context(), repo.tenant(), None).await?;
    refuse_during_epoch_shred(fresh.descriptor())?;
    settle_pending_key(&mut fresh, lease).await?;
    prove_current_key(&fresh).await?;
    // A tenant made before key claims existed gets its current key's claim
    // while its envelopes prove it, so the key stays provable (and
    // destroyable by a shred) after a replacement moves them away.
    let key = fresh.descriptor().key.clone();
    let claim_bytes = ownership::ensure_claimed(fresh.context(), fresh.store(), &key)
        .await?
        .1;
    let plan = plan::plan(&fresh, action).await?;
    let mut report = execute::execute(&mut fresh, lease, plan).await?;
    fresh.forget_keys().await;
    report.bytes_written += claim_bytes;
    report.objects_written += u64::from(claim_bytes > 0);
    report.envelopes_rewrapped = report
        .envelopes
        .iter()
        .filter(|e| e.bytes_written > 0)
        .count();
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        event = "key.rotated",
        tenant = %report.tenant,
        action = report.action,
        key = %report.key_after,
        old_key = %report.key_before,
        old_version = report.key_version_before.as_deref(),
        new_version = report.key_version_after.as_deref(),
        old_epoch = report.epoch_before,
        new_epoch = report.epoch_after,
        envelopes_rewrapped = report.envelopes_rewrapped,
        bytes_written = report.bytes_written,
        resumed = report.resumed,
        duration_ms = report.duration_ms,
        "{} rotation of {} done: {} envelope(s) re-wrapped, {} bytes written",
        report.action,
        report.tenant,
        report.envelopes_rewrapped,
        report.bytes_written
    );
    Ok(report)
}

/// What [`run`] would do now (`rotate --dry-run`): the plan, without settling,
/// claiming or writing anything.
pub async fn preview(repo: &Repo, action: &RotateAction) -> Result<RotateReport> {
    let started = Instant::now();
    repo.require_active("rotation")?;
    let fresh = Repo::open(repo.context(), repo.tenant(), None).await?;
    refuse_during_epoch_shred(fresh.descriptor())?;
    prove_current_key(&fresh).await?;
    let plan = plan::plan(&fresh, action).await;
    fresh.forget_keys().await;
    let mut report = plan?.preview();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Every rotation acts on the descriptor's current key (new material,
/// re-wraps under it, a new data key under it): the descriptor alone, which
/// a store writer can edit, must not choose it.
async fn prove_current_key(repo: &Repo) -> Result<()> {
    let key = &repo.descriptor().key;
    match ownership::prove(repo.context(), repo.store(), key, None).await? {
        Ok(_) => Ok(()),
        Err(unproven) => Err(Error::KeyOwnershipUnproven {
            key: key.to_string(),
            tenant: repo.tenant().to_string(),
            message: format!(
                "the descriptor names it as the tenant's current key, but {unproven}: custos does not \
                 rotate, re-wrap or make data keys under a key it cannot prove the tenant's"
            ),
        }),
    }
}

/// An unfinished epoch shred decides the tenant's keys until it ends: a
/// shred with a re-wrap fixed which keys it destroys and moves the envelopes
/// itself (its `pending_key`), and any shred deletes the epoch's envelope,
/// which a re-wrap in between would write anew. Once a shred without a
/// re-wrap has deleted (only verification and its certificate are left), a
/// rotation may run beside it: it leaves that epoch's envelope alone (see
/// [`envelopes::epochs`]). That matters when the store retains the envelope
/// (Object Lock) and the shred cannot verify: replacing the CMK and deleting
/// the old one is then how the retained envelope becomes unreadable.
pub fn refuse_during_epoch_shred(d: &Descriptor) -> Result<()> {
    let Some(es) = &d.epoch_shred else {
        return Ok(());
    };
    let deleted = es.shred.progress.as_ref().is_some_and(|p| {
        matches!(
            p.step,
            ShredStep::Deleted | ShredStep::Verified | ShredStep::Certified
        )
    });
    if es.rewrap_to.is_none() && deleted {
        return Ok(());
    }
    let t = &d.tenant;
    let how = if es.rewrap_to.is_some() {
        " with the same --rewrap or --rewrap-to it was started with"
    } else {
        ""
    };
    Err(Error::TenantState {
        tenant: t.to_string(),
        state: "epoch_shredding".into(),
        message: format!(
            "has an unfinished shred of epoch {}: no key rotation until it ends; finish it first \
             (custos shred {t} --epoch {} --confirm {t}{how})",
            es.epoch, es.epoch
        ),
    })
}

/// A `pending_key` nothing proves the tenant's (no key claim, no registry
/// entry, no envelope unwrapping under it) is a store writer's, or left by a
/// custos that predates key claims before it moved anything: no envelope is
/// wrapped under it, so dropping it loses nothing, and following it would
/// move the tenant's data keys under someone else's key. A pending key that
/// cannot be tried (unusable) is refused: it cannot be told apart.
async fn settle_pending_key(repo: &mut Repo, lease: &LeaseGuard) -> Result<()> {
    let Some(pending) = repo.descriptor().pending_key.clone() else {
        return Ok(());
    };
    let ctx = repo.context().clone();
    match ownership::prove(&ctx, repo.store(), &pending, None).await? {
        Ok(_) => Ok(()),
        Err(unproven) if unproven.tried_all => {
            lease.ensure_held()?;
            tracing::warn!(event = "key.pending_dropped", tenant = %repo.tenant(), key = %pending, "pending key {pending} dropped: {unproven}");
            ctx.record(
                "rotate.pending-key-dropped",
                Some(repo.tenant()),
                serde_json::json!({ "key": pending, "why": unproven.why }),
            )
            .await?;
            repo.update_descriptor(|d| {
                if d.pending_key.as_ref() == Some(&pending) {
                    d.pending_key = None;
                }
            })
            .await
        }
        Err(unproven) => Err(Error::KeyOwnershipUnproven {
            key: pending.to_string(),
            tenant: repo.tenant().to_string(),
            message: format!(
                "the descriptor says a move to it is in progress (pending_key), but {unproven}: custos \
                 cannot tell whether any envelope is wrapped under it, and will not follow a key the \
                 store alone names. Make the key usable so its claim can be checked"
            ),
        }),
    }
}

fn unusable(key: &KeyRef, info: &KeyInfo) -> Error {
    match &info.state {
        crate::keys::KeyState::Disabled => Error::Key(KeyError::Disabled {
            key: key.to_string(),
        }),
        crate::keys::KeyState::PendingDeletion { deletion_date } => {
            Error::Key(KeyError::PendingDeletion {
                key: key.to_string(),
                deletion_date: *deletion_date,
            })
        }
        other => Error::Key(KeyError::Backend {
            provider: key.kind().scheme(),
            key: key.to_string(),
            message: format!("the key is {}, not enabled", other.name()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;

    fn descriptor(days_old: i64) -> Descriptor {
        let t = Utc::now() - chrono::Duration::days(days_old);
        Descriptor::new(
            TenantId::new("acme").unwrap(),
            KeyRef::local("acme").unwrap(),
            t,
        )
    }

    #[test]
    fn due_follows_the_policy() {
        let policy = RotationPolicy {
            cmk_every: Some(Duration::from_secs(90 * 86_400)),
            epoch_every: Some(Duration::from_secs(30 * 86_400)),
            schedule: None,
        };
        let now = Utc::now();
        assert!(due(&descriptor(10), &policy, now).is_empty());
        assert_eq!(
            due(&descriptor(40), &policy, now),
            vec![RotateAction::NewEpoch]
        );
        assert_eq!(
            due(&descriptor(100), &policy, now),
            vec![RotateAction::Cmk, RotateAction::NewEpoch]
        );
        let mut d = descriptor(100);
        d.cmk_rotated_at = Some(now - chrono::Duration::days(5));
        let s = rotation_status(&d, &policy, now);
        assert!(!s.cmk_due && s.epoch_due);
        assert_eq!(s.cmk_age_days, 5);
        assert_eq!(s.cmk_every.as_deref(), Some("90d"));
        // An interrupted move comes first, and alone.
        d.pending_key = Some(KeyRef::local("acme-2").unwrap());
        assert_eq!(
            due(&d, &policy, now),
            vec![RotateAction::FinishReplace {
                new_key: KeyRef::local("acme-2").unwrap(),
            }]
        );
        // Not active: nothing is due.
        let mut d = descriptor(100);
        d.state = Lifecycle::Shredding;
        assert!(due(&d, &policy, now).is_empty());
        assert!(
            due(
                &descriptor(1000),
                &RotationPolicy {
                    cmk_every: None,
                    epoch_every: None,
                    schedule: None
                },
                now
            )
            .is_empty()
        );
    }

    #[test]
    fn replace_policy_check() {
        let mut d = descriptor(1);
        let old = d.key.clone();
        let new = KeyRef::local("acme-2").unwrap();
        let other = KeyRef::local("other").unwrap();
        assert!(check_policy_for_replace(&d, &old, &new).is_ok());
        assert!(check_policy_for_replace(&d, &new, &new).is_ok());
        assert!(check_policy_for_replace(&d, &other, &new).is_err());
        d.previous_keys.push(old.clone());
        d.key = new.clone();
        assert!(check_policy_for_replace(&d, &old, &new).is_ok());
        assert!(check_policy_for_replace(&d, &old, &other).is_err());
    }
}

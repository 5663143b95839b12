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

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{PutMode, UpdateVersion};
use serde::Serialize;

use crate::config::RotationPolicy;
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, EpochRecord, EpochState, Lifecycle};
use crate::format::envelope::Envelope;
use crate::format::shred::KeyRole;
use crate::keys::{DataKey, Destruction, KeyError, KeyInfo, KeyRef, WrapContext};
use crate::repo::Repo;
use crate::repo::ownership::{self, Depth, Verdict};
use crate::store::lease::LeaseGuard;
use crate::store::{ObjectName, TenantStore};

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

#[derive(Debug, Clone)]
pub struct RotateOptions {
    pub action: RotateAction,
    /// Report what would be done; write nothing, change no key.
    pub dry_run: bool,
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
    pub duration_ms: u64,
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

struct Run<'a> {
    repo: Repo,
    report: &'a mut RotateReport,
    dry_run: bool,
}

/// Runs one rotation of the tenant `repo` was opened for, under its `lease`.
/// `repo` is re-read internally (the rotation updates the descriptor), so
/// callers pass what [`crate::jobs::runner::run_job`] gives them.
pub async fn run(repo: &Repo, lease: &LeaseGuard, opts: &RotateOptions) -> Result<RotateReport> {
    let started = Instant::now();
    repo.require_active("rotation")?;
    // A fresh handle of our own: updating the descriptor needs `&mut Repo`.
    let mut fresh = Repo::open(repo.context(), repo.tenant(), None).await?;
    let mut claim_bytes = 0;
    if !opts.dry_run {
        settle_pending_key(&mut fresh, lease).await?;
    }
    // Every rotation acts on the descriptor's current key (new material,
    // re-wraps under it, a new data key under it): the descriptor alone, which
    // a store writer can edit, must not choose it.
    let key = fresh.descriptor().key.clone();
    if let Err(unproven) = ownership::prove(fresh.context(), fresh.store(), &key, None).await? {
        return Err(Error::KeyOwnershipUnproven {
            key: key.to_string(),
            tenant: fresh.tenant().to_string(),
            message: format!(
                "the descriptor names it as the tenant's current key, but {unproven}: custos does not \
                 rotate, re-wrap or make data keys under a key it cannot prove the tenant's"
            ),
        });
    }
    if !opts.dry_run {
        // A tenant made before key claims existed gets its current key's
        // claim while its envelopes prove it, so the key stays provable (and
        // destroyable by a shred) after a replacement moves them away.
        claim_bytes = ownership::ensure_claimed(fresh.context(), fresh.store(), &key)
            .await?
            .1;
    }
    let d = fresh.descriptor().clone();
    let mut report = RotateReport {
        tenant: d.tenant.to_string(),
        action: opts.action.as_str(),
        dry_run: opts.dry_run,
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
        bytes_written: claim_bytes,
        objects_written: u64::from(claim_bytes > 0),
        old_key_deletion: None,
        duration_ms: 0,
    };
    let mut r = Run {
        repo: fresh,
        report: &mut report,
        dry_run: opts.dry_run,
    };
    if let Some(p) = &d.pending_key {
        let same = matches!(
            &opts.action,
            RotateAction::ReplaceCmk { new_key, .. } | RotateAction::FinishReplace { new_key } if new_key == p
        );
        if !same {
            return Err(Error::InvalidArgument(format!(
                "tenant {} is moving from key {} to {p} (an interrupted `rotate --replace-cmk`): \
                 finish it first with `custos rotate {} --replace-cmk {p}`",
                d.tenant, d.key, d.tenant
            )));
        }
    }
    match &opts.action {
        RotateAction::Cmk => r.cmk(lease).await?,
        RotateAction::ReplaceCmk {
            new_key,
            schedule_old_key_deletion,
        } => {
            r.replace(lease, new_key, *schedule_old_key_deletion)
                .await?
        }
        RotateAction::NewEpoch => r.new_epoch(lease).await?,
        // Nothing pending any more (finished, or dropped as unproven): nothing to do.
        RotateAction::FinishReplace { new_key } => {
            if d.pending_key.as_ref() == Some(new_key) {
                r.replace(lease, new_key, None).await?
            }
        }
    }
    if !opts.dry_run {
        r.verify_all().await?;
    }
    r.repo.forget_keys().await;
    report.envelopes_rewrapped = report
        .envelopes
        .iter()
        .filter(|e| e.bytes_written > 0)
        .count();
    report.duration_ms = started.elapsed().as_millis() as u64;
    if !opts.dry_run {
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
    }
    Ok(report)
}

impl Run<'_> {
    fn ctx(&self) -> &crate::context::Context {
        self.repo.context()
    }

    fn store(&self) -> &TenantStore {
        self.repo.store()
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo> {
        Ok(self.ctx().keys.key(key)?.describe().await?)
    }

    /// Envelopes to keep re-wrapped: every `keys/<n>` in the store whose epoch is
    /// not shredded (including one left by an interrupted `--new-epoch`), and
    /// every live epoch of the descriptor, which must have one.
    async fn envelope_epochs(&self) -> Result<Vec<u32>> {
        let d = self.repo.descriptor();
        let mut epochs = self.repo.unshredded_envelope_epochs().await?;
        for e in d.live_epochs() {
            if !epochs.contains(&e.epoch) {
                return Err(Error::missing(
                    self.store().display(&ObjectName::Envelope(e.epoch)),
                    format!("the envelope of live epoch {} is gone", e.epoch),
                ));
            }
        }
        epochs.sort_unstable();
        Ok(epochs)
    }

    async fn read_envelope(&self, epoch: u32) -> Result<(Envelope, UpdateVersion)> {
        let name = ObjectName::Envelope(epoch);
        let (bytes, meta) =
            self.store().get_if_exists(&name).await?.ok_or_else(|| {
                Error::missing(self.store().display(&name), "not found in the store")
            })?;
        let env =
            Envelope::parse(&bytes).map_err(|e| Error::corrupt(self.store().display(&name), e))?;
        if &env.tenant != self.repo.tenant() || env.epoch != epoch {
            return Err(Error::Foreign {
                object: self.store().display(&name),
                reason: format!("envelope is for tenant {} epoch {}", env.tenant, env.epoch),
            });
        }
        Ok((
            env,
            UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
        ))
    }

    async fn unwrap_checked(&self, env: &Envelope, under: &KeyRef) -> Result<DataKey> {
        let name = ObjectName::Envelope(env.epoch);
        let dk = self
            .ctx()
            .keys
            .key(under)?
            .unwrap(&env.wrapped, &env.context())
            .await?;
        if dk.fingerprint() != env.fingerprint {
            return Err(Error::corrupt(
                self.store().display(&name),
                "unwrapped key does not match the envelope's fingerprint",
            ));
        }
        Ok(dk)
    }

    /// Re-wraps one envelope under `to` (its newest material) and replaces it
    /// atomically, but only after the new wrap was unwrapped and checked.
    async fn rewrap(&mut self, lease: &LeaseGuard, epoch: u32, to: &KeyRef) -> Result<()> {
        let (env, version) = self.read_envelope(epoch).await?;
        let mut change = EnvelopeChange {
            epoch,
            key_before: env.key.clone(),
            key_after: to.clone(),
            version_before: env.wrapped.key_version.clone(),
            version_after: None,
            bytes_written: 0,
        };
        if self.dry_run {
            self.report.envelopes.push(change);
            return Ok(());
        }
        let wrapped = self
            .ctx()
            .keys
            .rewrap(&env.key, &env.wrapped, &env.context(), to)
            .await?;
        let mut new = env.clone();
        new.key = to.clone();
        new.wrapped = wrapped;
        new.rewrapped_at = Some(Utc::now());
        self.unwrap_checked(&new, to).await?;
        let body = new.to_json();
        lease.ensure_held()?;
        let name = ObjectName::Envelope(epoch);
        self.store()
            .put_conditional(&name, Bytes::from(body.clone()), PutMode::Update(version))
            .await
            .map_err(|e| match e {
                object_store::Error::Precondition { .. } => Error::LeaseContended {
                    tenant: self.repo.tenant().to_string(),
                    holder: format!(
                        "another writer changed {} during the rotation",
                        self.store().display(&name)
                    ),
                    expires: "n/a".into(),
                },
                e => Error::store("put", self.store().display(&name), e),
            })?;
        change.version_after = new.wrapped.key_version.clone();
        change.bytes_written = body.len() as u64;
        self.report.bytes_written += body.len() as u64;
        self.report.objects_written += 1;
        self.report.envelopes.push(change);
        Ok(())
    }

    async fn update_descriptor(
        &mut self,
        lease: &LeaseGuard,
        f: impl FnOnce(&mut Descriptor),
    ) -> Result<()> {
        lease.ensure_held()?;
        self.repo.update_descriptor(f).await?;
        self.report.bytes_written += self.repo.descriptor().to_json().len() as u64;
        self.report.objects_written += 1;
        Ok(())
    }

    async fn cmk(&mut self, lease: &LeaseGuard) -> Result<()> {
        let key = self.repo.descriptor().key.clone();
        let before = self.describe(&key).await?;
        if !before.state.is_usable() {
            return Err(unusable(&key, &before));
        }
        self.report.key_version_before = before.current_version.clone();
        self.report.key_version_after = before.current_version.clone();
        // A run interrupted after the provider rotated: some envelope was not
        // re-wrapped since. Finish it without rotating the key once more.
        let mut todo = Vec::new();
        let marker = self.repo.descriptor().cmk_rotated_at;
        for epoch in self.envelope_epochs().await? {
            let (env, _) = self.read_envelope(epoch).await?;
            let done_at = env.rewrapped_at.unwrap_or(env.created_at);
            if marker.is_none_or(|m| done_at < m) || env.key != key {
                todo.push(epoch);
            }
        }
        let interrupted = marker.is_some() && !todo.is_empty();
        if interrupted {
            self.report.resumed = true;
        } else {
            todo = self.envelope_epochs().await?;
            if !self.dry_run {
                let after = self.ctx().keys.key(&key)?.rotate().await?;
                self.report.key_version_after = after.current_version.clone();
                let now = Utc::now();
                self.update_descriptor(lease, |d| d.cmk_rotated_at = Some(now))
                    .await?;
            }
        }
        for epoch in todo {
            self.rewrap(lease, epoch, &key).await?;
        }
        Ok(())
    }

    async fn replace(
        &mut self,
        lease: &LeaseGuard,
        new_key: &KeyRef,
        schedule_old_key_deletion: Option<u32>,
    ) -> Result<()> {
        let d = self.repo.descriptor().clone();
        self.report.key_after = new_key.clone();
        let old = if &d.key == new_key {
            // Done before (re-run): the old key is the last previous one.
            d.previous_keys.last().cloned()
        } else {
            Some(d.key.clone())
        };
        self.report.key_before = old.clone().unwrap_or_else(|| d.key.clone());
        // A new key for this tenant: refused if any other tenant uses it
        // (every other tenant's objects are tried under it) before custos
        // uses it at all, then claimed before the descriptor names it, so a
        // pending key is always provable and one without a claim is a store
        // writer's.
        let fresh_binding = &d.key != new_key && d.pending_key.as_ref() != Some(new_key);
        let (ctx, store) = (self.ctx().clone(), self.store().clone());
        if fresh_binding {
            ownership::check_bindable(&ctx, store.tenant(), new_key, Depth::Authenticated).await?;
        } else {
            // A resumed move: the pending key comes from the descriptor (store
            // JSON), and the rules may have changed since the move began.
            ctx.residency.check_key(new_key).map_err(|v| {
                Error::Policy(format!(
                    "refusing {new_key} for tenant {}: {v}",
                    store.tenant()
                ))
            })?;
        }
        self.probe_new_key(new_key).await?;
        if fresh_binding && !self.dry_run {
            let written = ownership::record_binding(&ctx, &store, new_key, "replace-cmk").await?;
            self.report.bytes_written += written;
            self.report.objects_written += u64::from(written > 0);
        }
        if d.pending_key.as_ref() == Some(new_key) {
            self.report.resumed = true;
        } else if &d.key != new_key && !self.dry_run {
            // The key's age counts from here: envelopes re-wrapped from now on are
            // newer than `cmk_rotated_at`, which is what `--cmk` resumption reads.
            let pending = new_key.clone();
            let now = Utc::now();
            self.update_descriptor(lease, |d| {
                d.pending_key = Some(pending);
                d.cmk_rotated_at = Some(now);
            })
            .await?;
        }
        for epoch in self.envelope_epochs().await? {
            let (env, _) = self.read_envelope(epoch).await?;
            if &env.key != new_key {
                self.rewrap(lease, epoch, new_key).await?;
            }
        }
        if self.dry_run {
            return Ok(());
        }
        if &self.repo.descriptor().key != new_key {
            let (old_key, new) = (self.repo.descriptor().key.clone(), new_key.clone());
            self.update_descriptor(lease, |d| {
                if !d.previous_keys.contains(&old_key) {
                    d.previous_keys.push(old_key);
                }
                d.key = new;
                d.pending_key = None;
            })
            .await?;
        }
        if let (Some(days), Some(old)) = (schedule_old_key_deletion, old) {
            // Only once every envelope verifiably unwraps under the new key.
            self.verify_all().await?;
            // The old key comes from the descriptor (on a re-run, its last
            // previous key): destroyed only when proven this tenant's and
            // used by no other tenant known anywhere.
            let (ctx, store) = (self.ctx().clone(), self.store().clone());
            // Not a key the envelopes just verified still need: the old key
            // on a re-run is the descriptor's last previous key, which a
            // store writer can set to the current one.
            ownership::refuse_if_wrapping_live_envelopes(&ctx, &store, &old, None, "rotate")
                .await?;
            let verdicts = ownership::decide_destroy(
                &ctx,
                &store,
                &[(old.clone(), KeyRole::Previous)],
                &[],
                "rotate",
            )
            .await?;
            match verdicts.first().map(|v| &v.verdict) {
                Some(Verdict::Destroy { .. }) => {
                    crate::jobs::deletion::wait_before_destroying_keys(&self.repo, "rotate")
                        .await?;
                    let cmk = ctx.keys.key(&old)?;
                    let destruction = cmk.destroy(days).await?;
                    ownership::record_destroyed(&ctx, store.tenant(), std::slice::from_ref(&old))?;
                    tracing::warn!(
                        event = "key.deletion_scheduled",
                        tenant = %self.repo.tenant(),
                        key = %old,
                        effective_at = %destruction.effective_at,
                        "old key of {} scheduled for deletion", self.repo.tenant()
                    );
                    self.report.old_key_deletion = Some(destruction);
                }
                _ => {
                    tracing::info!(event = "key.already_destroyed", tenant = %self.repo.tenant(), key = %old, "old key {old} is already destroyed or unknown to its provider");
                }
            }
        }
        Ok(())
    }

    /// Refuses a new key that is not enabled or that custos cannot use: describe,
    /// then a wrap and unwrap of a throwaway key under a context no envelope uses
    /// (epoch 0; epochs start at 1).
    async fn probe_new_key(&self, new_key: &KeyRef) -> Result<()> {
        let cmk = self.ctx().keys.key(new_key)?;
        let info = cmk.describe().await?;
        if !info.state.is_usable() {
            return Err(unusable(new_key, &info));
        }
        let throwaway = DataKey::generate();
        let ctx = WrapContext::tdk(self.repo.tenant(), 0);
        let wrapped = cmk.wrap(&throwaway, &ctx).await?;
        let back = cmk.unwrap(&wrapped, &ctx).await?;
        if back.fingerprint() != throwaway.fingerprint() {
            return Err(Error::Key(KeyError::Backend {
                provider: new_key.kind().scheme(),
                key: new_key.to_string(),
                message: "a test wrap did not unwrap to the same key".into(),
            }));
        }
        Ok(())
    }

    async fn new_epoch(&mut self, lease: &LeaseGuard) -> Result<()> {
        let d = self.repo.descriptor().clone();
        let next = d.epochs.iter().map(|e| e.epoch).max().unwrap_or(0) + 1;
        self.report.epoch_after = next;
        if self.dry_run {
            return Ok(());
        }
        let name = ObjectName::Envelope(next);
        let existed = self.store().head(&name).await?.is_some();
        lease.ensure_held()?;
        Repo::create_epoch_envelope(self.ctx(), self.store(), &d.key, next).await?;
        if existed {
            self.report.resumed = true;
        } else if let Some(meta) = self.store().head(&name).await? {
            self.report.bytes_written += meta.size;
            self.report.objects_written += 1;
            self.report.envelopes.push(EnvelopeChange {
                epoch: next,
                key_before: d.key.clone(),
                key_after: d.key.clone(),
                version_before: None,
                version_after: None,
                bytes_written: meta.size,
            });
        }
        let now = Utc::now();
        let current = d.current_epoch;
        self.update_descriptor(lease, |d| {
            for e in &mut d.epochs {
                if e.epoch == current && e.state == EpochState::Active {
                    e.state = EpochState::Retired;
                    e.retired_at = Some(now);
                }
            }
            d.epochs.push(EpochRecord {
                epoch: next,
                created_at: now,
                state: EpochState::Active,
                retired_at: None,
                shredded_at: None,
                certificate_id: None,
            });
            d.current_epoch = next;
        })
        .await?;
        Ok(())
    }

    /// Reads back every envelope and unwraps it under the key it names, which
    /// must be the tenant's key: nothing may still depend on an old one.
    async fn verify_all(&mut self) -> Result<()> {
        let key = self.repo.descriptor().key.clone();
        let mut n = 0;
        for epoch in self.envelope_epochs().await? {
            let (env, _) = self.read_envelope(epoch).await?;
            if env.key != key {
                return Err(Error::Internal(format!(
                    "after the rotation, {} is still wrapped under {} instead of {key}",
                    self.store().display(&ObjectName::Envelope(epoch)),
                    env.key
                )));
            }
            self.unwrap_checked(&env, &key).await?;
            n += 1;
        }
        self.report.envelopes_verified = n;
        Ok(())
    }
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

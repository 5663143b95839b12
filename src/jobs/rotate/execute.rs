//! Carries out a [`RotatePlan`], step by step, under the tenant's lease.
//!
//! Each step writes the new state before the old one stops being usable and
//! is idempotent, so re-running the same command after a crash plans what is
//! left and finishes it.

use bytes::Bytes;
use chrono::Utc;
use object_store::PutMode;

use super::plan::{RotatePlan, Step};
use super::{EnvelopeChange, RotateReport, envelopes};
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, EpochRecord, EpochState};
use crate::format::shred::KeyRole;
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::repo::ownership::{self, Verdict};
use crate::store::ObjectName;
use crate::store::lease::LeaseGuard;

/// Executes `plan` (made from `repo` under `lease`), then reads back and
/// unwraps every envelope. The report lists what was written.
pub(super) async fn execute(
    repo: &mut Repo,
    lease: &LeaseGuard,
    plan: RotatePlan,
) -> Result<RotateReport> {
    let RotatePlan { steps, mut report } = plan;
    // Rebuilt from what is written, with the sizes and versions after.
    report.envelopes.clear();
    let mut x = Executor {
        repo,
        report: &mut report,
    };
    for step in &steps {
        x.step(lease, step).await?;
    }
    report.envelopes_verified = envelopes::verify_all(repo).await?;
    report.steps = steps;
    Ok(report)
}

struct Executor<'a> {
    repo: &'a mut Repo,
    report: &'a mut RotateReport,
}

impl Executor<'_> {
    async fn step(&mut self, lease: &LeaseGuard, step: &Step) -> Result<()> {
        match step {
            Step::NewMaterial { key } => {
                let after = self.repo.context().keys.key(key)?.rotate().await?;
                self.report.key_version_after = after.current_version;
                let now = Utc::now();
                self.update_descriptor(lease, |d| d.cmk_rotated_at = Some(now))
                    .await
            }
            Step::Claim { key } => {
                let written = ownership::record_binding(
                    self.repo.context(),
                    self.repo.store(),
                    key,
                    "replace-cmk",
                )
                .await?;
                self.count_write(written);
                Ok(())
            }
            Step::MarkPending { key } => {
                // The key's age counts from here: envelopes re-wrapped from now
                // on are newer than `cmk_rotated_at`, which `--cmk` resumption reads.
                let (pending, now) = (key.clone(), Utc::now());
                self.update_descriptor(lease, |d| {
                    d.pending_key = Some(pending);
                    d.cmk_rotated_at = Some(now);
                })
                .await
            }
            Step::Rewrap { epoch, to, .. } => self.rewrap(lease, *epoch, to).await,
            Step::SwitchKey { to, .. } => {
                if &self.repo.descriptor().key == to {
                    return Ok(());
                }
                let (old, new) = (self.repo.descriptor().key.clone(), to.clone());
                self.update_descriptor(lease, |d| {
                    if !d.previous_keys.contains(&old) {
                        d.previous_keys.push(old);
                    }
                    d.key = new;
                    d.pending_key = None;
                })
                .await
            }
            Step::ScheduleDeletion { key, days } => self.schedule_deletion(key, *days).await,
            Step::NewEpoch { epoch, key } => self.new_epoch(lease, *epoch, key).await,
        }
    }

    fn count_write(&mut self, bytes: u64) {
        self.report.bytes_written += bytes;
        self.report.objects_written += u64::from(bytes > 0);
    }

    async fn update_descriptor(
        &mut self,
        lease: &LeaseGuard,
        f: impl FnOnce(&mut Descriptor),
    ) -> Result<()> {
        lease.ensure_held()?;
        self.repo.update_descriptor(f).await?;
        let size = self.repo.descriptor().to_json().len() as u64;
        self.report.bytes_written += size;
        self.report.objects_written += 1;
        Ok(())
    }

    /// Re-wraps one envelope under `to` (its newest material) and replaces it
    /// atomically, but only after the new wrap was unwrapped and checked.
    async fn rewrap(&mut self, lease: &LeaseGuard, epoch: u32, to: &KeyRef) -> Result<()> {
        let repo = &*self.repo;
        let (env, version) = envelopes::read(repo, epoch).await?;
        let wrapped = repo
            .context()
            .keys
            .rewrap(&env.key, &env.wrapped, &env.context(), to)
            .await?;
        let mut new = env.clone();
        new.key = to.clone();
        new.wrapped = wrapped;
        new.rewrapped_at = Some(Utc::now());
        envelopes::unwrap_checked(repo, &new, to).await?;
        let body = new.to_json();
        lease.ensure_held()?;
        let store = repo.store();
        let name = ObjectName::Envelope(epoch);
        store
            .put_conditional(&name, Bytes::from(body.clone()), PutMode::Update(version))
            .await
            .map_err(|e| match e {
                object_store::Error::Precondition { .. } => Error::LeaseContended {
                    tenant: repo.tenant().to_string(),
                    holder: format!(
                        "another writer changed {} during the rotation",
                        store.display(&name)
                    ),
                    expires: "n/a".into(),
                },
                e => Error::store("put", store.display(&name), e),
            })?;
        self.count_write(body.len() as u64);
        self.report.envelopes.push(EnvelopeChange {
            epoch,
            key_before: env.key,
            key_after: to.clone(),
            version_before: env.wrapped.key_version,
            version_after: new.wrapped.key_version,
            bytes_written: body.len() as u64,
        });
        Ok(())
    }

    /// The old key's deletion, only once every envelope verifiably unwraps
    /// under the new key, and only when the key is proven this tenant's and
    /// used by no other tenant known anywhere.
    async fn schedule_deletion(&mut self, old: &KeyRef, days: u32) -> Result<()> {
        let repo = &*self.repo;
        envelopes::verify_all(repo).await?;
        let (ctx, store) = (repo.context(), repo.store());
        // The old key on a re-run is the descriptor's last previous key, which
        // a store writer can set to the current one: never a key the envelopes
        // just verified still need.
        ownership::refuse_if_wrapping_live_envelopes(ctx, store, old, None, "rotate").await?;
        let verdicts = ownership::decide_destroy(
            ctx,
            store,
            &[(old.clone(), KeyRole::Previous)],
            &[],
            "rotate",
        )
        .await?;
        match verdicts.first().map(|v| &v.verdict) {
            Some(Verdict::Destroy { .. }) => {
                crate::jobs::deletion::wait_before_destroying_keys(repo, "rotate").await?;
                let destruction = ctx.keys.key(old)?.destroy(days).await?;
                ownership::record_destroyed(ctx, store.tenant(), std::slice::from_ref(old))?;
                tracing::warn!(
                    event = "key.deletion_scheduled",
                    tenant = %repo.tenant(),
                    key = %old,
                    effective_at = %destruction.effective_at,
                    "old key of {} scheduled for deletion", repo.tenant()
                );
                self.report.old_key_deletion = Some(destruction);
            }
            _ => {
                tracing::info!(event = "key.already_destroyed", tenant = %repo.tenant(), key = %old, "old key {old} is already destroyed or unknown to its provider");
            }
        }
        Ok(())
    }

    async fn new_epoch(&mut self, lease: &LeaseGuard, next: u32, key: &KeyRef) -> Result<()> {
        let name = ObjectName::Envelope(next);
        lease.ensure_held()?;
        Repo::create_epoch_envelope(self.repo.context(), self.repo.store(), key, next).await?;
        if !self.report.resumed
            && let Some(meta) = self.repo.store().head(&name).await?
        {
            self.count_write(meta.size);
            self.report.envelopes.push(EnvelopeChange {
                epoch: next,
                key_before: key.clone(),
                key_after: key.clone(),
                version_before: None,
                version_after: None,
                bytes_written: meta.size,
            });
        }
        let now = Utc::now();
        let current = self.repo.descriptor().current_epoch;
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
        .await
    }
}

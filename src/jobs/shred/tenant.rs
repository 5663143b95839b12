//! The tenant as a shred subject: every object under its prefix, every key
//! it owns (see the parent module for the steps).

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::json;

use super::certificate::{Certificate, Guarantee, GuaranteeKind, Subject};
use super::delete::delete_in_scope;
use super::engine::{Begun, Progress, Records, ShredSubject, Step, missing, new_progress, scoped};
use super::issue::{
    SubjectTerms, certificate_body, new_certificate_id, not_destroyed, pending_note, spared_note,
};
use super::journal::{Journal, Slot};
use super::keys::{all_tenant_keys, decide_up_front, destroy_keys_step, key_state_checks};
use super::preview::ShredPreview;
use super::scope;
use super::verify::{
    KEY_NOT_DESTROYED, sample_pack_present, spared_envelopes, unwrap_checks, verification_failure,
};
use super::{ShredReport, ShredRequest, holds};
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, EpochState, Lifecycle, ShredState};
use crate::format::shred::{DeletionRecord, PackCheck, ScopeRecord, ShredStep, VerificationRecord};
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::store::lease::LeaseGuard;
use crate::store::tenant::Listed;

const SLOT: Slot = Slot::Tenant;

/// What a shred of the whole tenant would do now, refused where it would be.
pub(super) async fn preview(repo: &Repo, req: &ShredRequest) -> Result<ShredPreview> {
    let mut p = ShredPreview::new(repo, None);
    match repo.descriptor().state {
        Lifecycle::Shredded => p.done(
            repo.descriptor()
                .shredding
                .as_ref()
                .and_then(|s| s.certificate_id.clone()),
        ),
        Lifecycle::Shredding => p.resume(SLOT.progress(repo.descriptor()).map(|p| p.step).ok()),
        Lifecycle::Active => {
            p.keys(decide_up_front(repo, &req.skip_unproven).await?);
            p.scope(&scope_objects(repo).await?);
        }
    }
    Ok(p)
}

/// A shred of the whole tenant.
pub(super) struct TenantSubject;

impl ShredSubject for TenantSubject {
    const SLOT: Slot = SLOT;

    fn epoch(&self) -> Option<u32> {
        None
    }

    async fn begin(&mut self, repo: &mut Repo, req: &ShredRequest) -> Result<Begun> {
        match repo.descriptor().state {
            Lifecycle::Shredded => Ok(Begun::Finished(Box::new(already_shredded(repo).await?))),
            Lifecycle::Shredding => {
                let step = SLOT.progress(repo.descriptor()).map(|p| p.step).ok();
                if step.is_none() {
                    // Fenced by something that kept no step records, with a
                    // request (reason, requester, start) only the store
                    // states: custos records the operator's own request, as
                    // its fence does, under a fresh id (a store writer can
                    // name an earlier lineage's certificate, which would then
                    // be "adopted"), and the descriptor states that request.
                    let state = record_fence(repo, req).await?;
                    repo.update_descriptor(|d| d.shredding = Some(state))
                        .await?;
                }
                tracing::info!(event = "shred.resumed", tenant = %repo.tenant(), after_step = step.map(|s| s.as_str()), "resuming an interrupted shred");
                Ok(Begun::Resumed(step))
            }
            Lifecycle::Active => {
                decide_up_front(repo, &req.skip_unproven).await?;
                fence(repo, req).await?;
                Ok(Begun::Started)
            }
        }
    }

    fn steps(&self, _d: &Descriptor) -> Vec<Step> {
        vec![Step::Scope, Step::Keys, Step::Delete, Step::Verify]
    }

    async fn run(
        &mut self,
        step: Step,
        repo: &mut Repo,
        journal: &Journal,
        _lease: &LeaseGuard,
    ) -> Result<Progress> {
        match step {
            Step::Scope => scope(repo, journal).await.map(Progress::Scoped),
            Step::Keys => {
                let keys = all_tenant_keys(repo).await?;
                let keys = destroy_keys_step(repo, journal, SLOT, &keys).await?;
                Ok(Progress::KeysDestroyed {
                    keys,
                    at: crate::hooks::now(),
                })
            }
            Step::Delete => delete(repo, journal).await.map(Progress::Deleted),
            Step::Verify => verify(repo, journal).await.map(Progress::Verified),
            Step::Rewrap => Err(Error::Internal("a tenant shred has no re-wrap step".into())),
        }
    }

    /// With its keys destroyed, every epoch of the tenant is shredded.
    fn on_recorded(&self, d: &mut Descriptor, p: &Progress) {
        if let Progress::KeysDestroyed { at, .. } = p {
            for e in &mut d.epochs {
                if e.state != EpochState::Shredded {
                    e.state = EpochState::Shredded;
                    e.shredded_at = Some(*at);
                }
            }
        }
    }

    fn certificate(&self, repo: &Repo, r: &Records<'_>) -> Result<Certificate> {
        body(repo, r)
    }

    fn confirm_terms(&self, _body: &Certificate) -> (bool, Option<KeyRef>) {
        (true, None)
    }

    fn finish(&self, d: &mut Descriptor, _certificate_id: &str, now: DateTime<Utc>) {
        d.state = Lifecycle::Shredded;
        if let Some(s) = d.shredding.as_mut() {
            s.finished_at = Some(now);
            if let Some(p) = s.progress.as_mut() {
                p.step = ShredStep::Certified;
                // The wrapped copies were kept for verification only.
                if let Some(scope) = p.scope.as_mut() {
                    scope.captured.clear();
                }
            }
        }
    }

    fn certified(&self, repo: &Repo, certificate_id: &str) {
        tracing::info!(event = "shred.certified", tenant = %repo.tenant(), certificate_id = %certificate_id, "tenant shredded; certificate stored");
    }
}

async fn already_shredded(repo: &Repo) -> Result<ShredReport> {
    let tenant = repo.tenant();
    let id = repo
        .descriptor()
        .shredding
        .as_ref()
        .and_then(|s| s.certificate_id.clone())
        .ok_or_else(|| Error::TenantState {
            tenant: tenant.to_string(),
            state: "shredded".into(),
            message: "is shredded but its descriptor names no certificate".into(),
        })?;
    // Reported only if it is this tenant's and what it states still holds:
    // its keys destroyed, no key the tenant is known to own missing from it,
    // the prefix empty but for retained ciphertext.
    holds::finished_report(repo, &id, None, "tenant", |_| true, true).await
}

/// Step 1: the descriptor becomes `shredding`.
async fn fence(repo: &mut Repo, req: &ShredRequest) -> Result<()> {
    let state = record_fence(repo, req).await?;
    let id = state.certificate_id.clone().unwrap_or_default();
    repo.update_descriptor(|d| {
        d.state = Lifecycle::Shredding;
        d.epoch_shred = None;
        d.shredding = Some(state);
    })
    .await?;
    tracing::info!(event = "shred.fenced", tenant = %repo.tenant(), certificate_id = %id, "tenant fenced: no backup, restore or new data key from now on");
    let journal = Journal::new(repo, SLOT, None)?;
    journal.crash("fence");
    journal
        .end(
            "fence",
            json!({ "state": "shredding", "generation": repo.descriptor().generation }),
        )
        .await?;
    Ok(())
}

/// Records the request in `shred.fence.begin` under a fresh certificate id
/// (what a certificate may state of the request is what is recorded there)
/// and returns the shred state that states it.
async fn record_fence(repo: &Repo, req: &ShredRequest) -> Result<ShredState> {
    let ctx = repo.context();
    let now = crate::hooks::now();
    let id = new_certificate_id(now);
    let progress = new_progress(req, now, ctx.actor.clone());
    let details = json!({
        "certificate_id": id,
        "started_at": now,
        "reason": req.reason,
        "requested_by": req.requested_by,
        "requested_at": progress.requested_at,
        "skip_unproven": progress.skip_unproven,
        "key": repo.descriptor().key,
        "epochs": repo.descriptor().epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
    });
    ctx.record("shred.fence.begin", Some(repo.tenant()), details)
        .await?;
    Ok(ShredState {
        started_at: now,
        finished_at: None,
        reason: req.reason.clone(),
        requested_by: req.requested_by.clone(),
        certificate_id: Some(id),
        progress: Some(progress),
    })
}

/// Step 2: list and capture everything, record count, bytes and root.
async fn scope(repo: &Repo, journal: &Journal) -> Result<ScopeRecord> {
    journal.begin("scope", json!({})).await?;
    scope::record(repo, journal, &scope_objects(repo).await?).await
}

/// Every object under the tenant's prefix that a tenant shred covers.
async fn scope_objects(repo: &Repo) -> Result<Vec<Listed>> {
    Ok(repo
        .list_objects()
        .await?
        .into_iter()
        .filter(scope::in_tenant_scope)
        .collect())
}

/// Step 4: delete everything under the prefix but the descriptor.
async fn delete(repo: &Repo, journal: &Journal) -> Result<DeletionRecord> {
    let scope = scoped(repo, SLOT.progress(repo.descriptor())?)?;
    delete_in_scope(repo, journal, scope, |repo| scope_objects(repo).boxed()).await
}

/// Step 5: nothing may unwrap any more; the keys must show destruction.
async fn verify(repo: &Repo, journal: &Journal) -> Result<VerificationRecord> {
    let ctx = repo.context();
    let progress = SLOT.progress(repo.descriptor())?;
    let scope = scoped(repo, progress)?;
    let keys = progress
        .keys
        .as_ref()
        .ok_or_else(|| missing(repo, "keys"))?;
    journal
        .begin("verify", json!({ "envelopes": scope.captured.len() }))
        .await?;
    let (to_try, spared) = spared_envelopes(&scope.captured, keys);
    let (mut envelopes, unwraps_refused) = unwrap_checks(ctx, &to_try).await?;
    envelopes.extend(spared);
    let (key_states, states_ok) = key_state_checks(ctx, keys).await;
    let pack_sample = match &scope.sample_pack {
        None => None,
        Some(s) => {
            let present = sample_pack_present(repo, &s.object).await?;
            let of_epoch = |outcome: &str| {
                envelopes
                    .iter()
                    .any(|c| c.epoch == s.epoch && c.outcome == outcome)
            };
            // Under a key left untouched, a deleted pack is all that can be
            // said (the certificate states the key lives on).
            let gone = of_epoch("refused") || of_epoch(KEY_NOT_DESTROYED);
            Some(PackCheck {
                object: s.object.clone(),
                epoch: s.epoch,
                present,
                outcome: match (present, of_epoch("refused"), gone) {
                    (true, true, _) => "undecryptable".into(),
                    (false, _, true) => "deleted".into(),
                    _ => "decryptable".into(),
                },
            })
        }
    };
    let pack_ok = pack_sample
        .as_ref()
        .is_none_or(|p| p.outcome != "decryptable");
    let remaining = repo
        .list_objects()
        .await?
        .iter()
        .filter(|l| scope::in_tenant_scope(l))
        .count() as u64;
    let passed = unwraps_refused && states_ok && pack_ok;
    let record = VerificationRecord {
        verified_at: crate::hooks::now(),
        passed,
        envelopes,
        pack_sample,
        key_states,
        remaining_objects: remaining,
        envelope_absent: None,
    };
    journal
        .end("verify", serde_json::to_value(&record).unwrap_or_default())
        .await?;
    if !passed {
        return Err(Error::ShredVerification {
            tenant: repo.tenant().to_string(),
            message: verification_failure(&record),
        });
    }
    Ok(record)
}

/// The certificate body, from the descriptor's records alone.
fn body(repo: &Repo, r: &Records<'_>) -> Result<Certificate> {
    let tenant = &repo.descriptor().tenant;
    let keys = r
        .progress
        .keys
        .clone()
        .ok_or_else(|| missing(repo, "keys"))?;
    let guarantee = match not_destroyed(&keys) {
        None => Guarantee::new(
            GuaranteeKind::KeysDestroyed,
            format!(
                "Every key that wrapped the data keys of tenant {tenant} (current, pending and previous CMKs) \
                 was destroyed; its data keys cannot be unwrapped, so all of its ciphertext, retained \
                 objects and any other copies included, is unrecoverable."
            ),
            pending_note(&keys),
        ),
        Some(spared) => Guarantee::new(
            GuaranteeKind::KeysPartlyDestroyed,
            format!(
                "The keys of tenant {tenant} listed as destroyed were destroyed, and the envelopes in scope \
                 wrapped under them no longer unwrap (see verification). Not destroyed: {spared}, which the \
                 shred left untouched on the operator's word because nothing proved it the tenant's own key \
                 or this configuration refuses to call its provider (each key's note says which); any copy \
                 of an envelope once wrapped under it (an earlier object version, a backup of the store) \
                 can still be unwrapped while it lives."
            ),
            Some(spared_note(&keys, &spared)),
        ),
    };
    let terms = SubjectTerms {
        subject: Subject::Tenant,
        epoch: None,
        guarantee,
        providers: keys.iter().map(|k| k.provider.clone()).collect(),
        keys,
        rewrap: None,
    };
    Ok(certificate_body(repo, r, terms))
}

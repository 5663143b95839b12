//! The steps of a tenant shred (see the parent module for the list).

use chrono::Utc;
use futures::FutureExt;
use serde_json::json;

use super::certificate::{self, Certificate, Guarantee, GuaranteeKind, Subject};
use super::scope::{self, ScopeObject};
use super::{
    Journal, ShredReport, ShredRequest, Slot, delete_in_scope, destroy_keys_step,
    issue_certificate, key_state_checks, new_certificate_id, pending_note, sample_pack_present,
    save, store_info, unwrap_checks,
};
use crate::error::{Error, Result};
use crate::format::descriptor::{EpochState, Lifecycle, ShredState};
use crate::format::seal::{HEADER_LEN, Header};
use crate::format::shred::{
    PackCheck, SamplePack, ScopeRecord, ShredProgress, ShredStep, VerificationRecord,
};
use crate::repo::Repo;
use crate::repo::ownership;
use crate::store::ObjectName;
use crate::store::lease::LeaseGuard;

const SLOT: Slot = Slot::Tenant;

pub(super) async fn run(
    repo: &mut Repo,
    lease: &LeaseGuard,
    req: &ShredRequest,
) -> Result<ShredReport> {
    let resumed_after = match repo.descriptor().state {
        Lifecycle::Shredded => return already_shredded(repo).await,
        Lifecycle::Shredding => {
            let step = SLOT.progress(repo.descriptor()).map(|p| p.step).ok();
            if step.is_none() {
                // Fenced by something that kept no step records: start them now.
                let now = Utc::now();
                repo.update_descriptor(|d| {
                    if let Some(s) = d.shredding.as_mut() {
                        // A fresh id: custos' own fence always records its
                        // steps, so an id without them is not one it chose
                        // (a store writer can name an earlier lineage's
                        // certificate, which would then be "adopted").
                        s.certificate_id = Some(new_certificate_id(now));
                        s.progress = Some(new_progress(req, now));
                    }
                })
                .await?;
            }
            tracing::info!(event = "shred.resumed", tenant = %repo.tenant(), after_step = step.map(|s| s.as_str()), "resuming an interrupted shred");
            let recorded = SLOT.progress(repo.descriptor())?.skip_unproven.clone();
            let skip = super::skip_list(req, SLOT.progress(repo.descriptor()).ok());
            if skip != recorded {
                save(repo, SLOT, |p| p.skip_unproven = skip).await?;
            }
            step
        }
        Lifecycle::Active => {
            // Which keys may be destroyed is decided before the fence, so a
            // refusal (a key not proven the tenant's, or in use by another
            // tenant) leaves the tenant as it was. The keys step decides again.
            let keys = super::all_tenant_keys(repo).await?;
            ownership::decide_destroy(
                repo.context(),
                repo.store(),
                &keys,
                &req.skip_unproven,
                "shred",
            )
            .await?;
            fence(repo, req).await?;
            None
        }
    };
    let journal = Journal::new(repo, SLOT, None)?;
    let progress = SLOT.progress(repo.descriptor())?.clone();
    if progress.scope.is_none() {
        scope(repo, &journal).await?;
    }
    if SLOT.progress(repo.descriptor())?.keys.is_none() {
        lease.ensure_held()?;
        keys(repo, &journal).await?;
    }
    if SLOT.progress(repo.descriptor())?.deletion.is_none() {
        lease.ensure_held()?;
        delete(repo, &journal).await?;
    }
    if SLOT.progress(repo.descriptor())?.verification.is_none() {
        verify(repo, &journal).await?;
    }
    lease.ensure_held()?;
    certify(repo, &journal, resumed_after).await
}

fn new_progress(req: &ShredRequest, now: chrono::DateTime<Utc>) -> ShredProgress {
    ShredProgress {
        step: ShredStep::Fenced,
        requested_at: req.requested_at.unwrap_or(now),
        actor: String::new(),
        pending_window_days: req.pending_window_days,
        skip_unproven: req.skip_unproven.clone(),
        scope: None,
        keys: None,
        executed_at: None,
        deletion: None,
        rewrap: None,
        verification: None,
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
    let bytes = super::load_certificate(&repo.context().store, tenant, &id)
        .await?
        .ok_or_else(|| {
            Error::missing(
                super::certificate_path(tenant, &id).to_string(),
                "the tenant is shredded but its certificate is not in the store",
            )
        })?;
    // The descriptor (store-writable) says "shredded" and names the
    // certificate: it is reported as this tenant's only if it is this
    // tenant's, and what it states still holds (its keys are destroyed, no
    // key the tenant is known to own is missing from it, the prefix is empty
    // but for retained ciphertext). Else a store writer could pass off
    // another tenant's (or an earlier lineage's) certificate as proof that
    // a live tenant was shredded.
    let path = super::certificate_path(tenant, &id).to_string();
    let doc =
        certificate::parse_unverified(&bytes).map_err(|e| Error::corrupt(&path, e.to_string()))?;
    super::check_identity(&doc.certificate, tenant, &id, None)
        .map_err(|why| Error::corrupt(&path, why))?;
    let problems = super::what_holds_now(repo, &doc.certificate, true, true, None).await?;
    if !problems.is_empty() {
        return Err(Error::ShredVerification {
            tenant: tenant.to_string(),
            message: format!(
                "its descriptor says it is shredded (certificate {id}), but {}: it is not shredded as that \
                 certificate states (the descriptor is not authenticated)",
                problems.join("; ")
            ),
        });
    }
    ShredReport::new(tenant, &id, bytes, true, None)
}

/// Step 1: the descriptor becomes `shredding`.
async fn fence(repo: &mut Repo, req: &ShredRequest) -> Result<()> {
    let ctx = repo.context().clone();
    let now = Utc::now();
    let id = new_certificate_id(now);
    let mut progress = new_progress(req, now);
    progress.actor = ctx.actor.clone();
    let details = json!({
        "certificate_id": id,
        "reason": req.reason,
        "requested_by": req.requested_by,
        "requested_at": progress.requested_at,
        "key": repo.descriptor().key,
        "epochs": repo.descriptor().epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
    });
    ctx.record("shred.fence.begin", Some(repo.tenant()), details)
        .await?;
    let state = ShredState {
        started_at: now,
        finished_at: None,
        reason: req.reason.clone(),
        requested_by: req.requested_by.clone(),
        certificate_id: Some(id.clone()),
        progress: Some(progress),
    };
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

/// Step 2: list and capture everything, record count, bytes and root.
async fn scope(repo: &mut Repo, journal: &Journal) -> Result<()> {
    journal.begin("scope", json!({})).await?;
    let tenant = repo.tenant().clone();
    let listed: Vec<_> = repo
        .list_objects()
        .await?
        .into_iter()
        .filter(scope::in_tenant_scope)
        .collect();
    let objects: Vec<ScopeObject> = listed
        .iter()
        .map(|l| ScopeObject::from_listed(&tenant, l))
        .collect();
    let own_keys: Vec<_> = super::all_tenant_keys(repo)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut captured = Vec::new();
    let mut foreign = Vec::new();
    let mut epochs = Vec::new();
    let mut sample_pack = None;
    for l in &listed {
        match &l.name {
            Some(ObjectName::Envelope(e)) => {
                epochs.push(*e);
                match repo.load_envelope(*e).await {
                    Ok(env) if own_keys.contains(&env.key) => captured.push(env),
                    Ok(env) => foreign.push(format!(
                        "tenants/{tenant}/keys/{e}: wrapped under {}, not a key of this tenant (not destroyed)",
                        env.key
                    )),
                    Err(err) => foreign.push(format!("tenants/{tenant}/keys/{e}: unreadable ({err})")),
                }
            }
            Some(ObjectName::Pack(id)) if sample_pack.is_none() => {
                let name = ObjectName::Pack(*id);
                if let Ok(head) = repo.store().get_range(&name, 0..HEADER_LEN as u64).await
                    && let Ok(epoch) = Header::peek_epoch(&head)
                {
                    sample_pack = Some(SamplePack {
                        object: repo.store().display(&name),
                        epoch,
                    });
                }
            }
            _ => {}
        }
    }
    let root = hex::encode(scope::merkle_root(&objects));
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    let receipt = journal
        .end(
            "scope",
            json!({
                "objects": objects.len(),
                "bytes": bytes,
                "merkle_root": root,
                "leaf_encoding": scope::LEAF_ENCODING,
                "envelopes": epochs,
                "foreign_envelopes": foreign.len(),
            }),
        )
        .await?;
    journal.crash("scope");
    let record = ScopeRecord {
        listed_at: Utc::now(),
        objects: objects.len() as u64,
        bytes,
        merkle_root: root,
        leaf_encoding: scope::LEAF_ENCODING.into(),
        envelopes: epochs,
        audit_seq: Some(receipt.seq),
        sample_pack,
        captured,
        foreign_envelopes: foreign,
    };
    save(repo, SLOT, |p| {
        p.scope = Some(record);
        p.step = ShredStep::Scoped;
    })
    .await
}

/// Step 3: destroy every key of the tenant.
async fn keys(repo: &mut Repo, journal: &Journal) -> Result<()> {
    let keys = super::all_tenant_keys(repo).await?;
    let destroyed = destroy_keys_step(repo, journal, SLOT, &keys).await?;
    let now = Utc::now();
    repo.update_descriptor(|d| {
        for e in &mut d.epochs {
            if e.state != EpochState::Shredded {
                e.state = EpochState::Shredded;
                e.shredded_at = Some(now);
            }
        }
        if let Some(p) = d.shredding.as_mut().and_then(|s| s.progress.as_mut()) {
            p.keys = Some(destroyed);
            p.executed_at = Some(now);
            p.step = ShredStep::KeysDestroyed;
        }
    })
    .await
}

/// Step 4: delete everything under the prefix but the descriptor.
async fn delete(repo: &mut Repo, journal: &Journal) -> Result<()> {
    let scope = SLOT
        .progress(repo.descriptor())?
        .scope
        .clone()
        .expect("scoped before");
    let record = delete_in_scope(repo, journal, &scope, |repo| {
        async {
            Ok(repo
                .list_objects()
                .await?
                .into_iter()
                .filter(scope::in_tenant_scope)
                .collect())
        }
        .boxed()
    })
    .await?;
    save(repo, SLOT, |p| {
        p.deletion = Some(record);
        p.step = ShredStep::Deleted;
    })
    .await
}

/// Step 5: nothing may unwrap any more; the keys must show destruction.
async fn verify(repo: &mut Repo, journal: &Journal) -> Result<()> {
    let ctx = repo.context().clone();
    let progress = SLOT.progress(repo.descriptor())?.clone();
    let scope = progress.scope.clone().expect("scoped before");
    let keys = progress.keys.clone().expect("keys destroyed before");
    journal
        .begin("verify", json!({ "envelopes": scope.captured.len() }))
        .await?;
    let (envelopes, unwraps_refused) = unwrap_checks(&ctx, &scope.captured).await?;
    let (key_states, states_ok) = key_state_checks(&ctx, &keys).await;
    let pack_sample = match &scope.sample_pack {
        None => None,
        Some(s) => {
            let present = sample_pack_present(repo, &s.object).await?;
            let refused = envelopes
                .iter()
                .any(|c| c.epoch == s.epoch && c.outcome == "refused");
            Some(PackCheck {
                object: s.object.clone(),
                epoch: s.epoch,
                present,
                outcome: match (present, refused) {
                    (_, false) => "decryptable".into(),
                    (true, true) => "undecryptable".into(),
                    (false, true) => "deleted".into(),
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
        verified_at: Utc::now(),
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
    journal.crash("verify");
    save(repo, SLOT, |p| {
        p.verification = Some(record);
        p.step = ShredStep::Verified;
    })
    .await
}

pub(super) fn verification_failure(r: &VerificationRecord) -> String {
    let mut why = Vec::new();
    for c in r.envelopes.iter().filter(|c| c.outcome != "refused") {
        why.push(format!(
            "the data key of epoch {} still unwraps under {}",
            c.epoch, c.key
        ));
    }
    for k in &r.key_states {
        match (&k.state, &k.error) {
            (Some(s), _) if !super::state_shows_destruction(s) => {
                why.push(format!("key {} is {}", k.reference, s.name()))
            }
            (None, Some(e)) => why.push(format!("key {}: {e}", k.reference)),
            _ => {}
        }
    }
    if let Some(p) = &r.pack_sample
        && p.outcome == "decryptable"
    {
        why.push(format!("pack {} is still decryptable", p.object));
    }
    if r.envelope_absent == Some(false) {
        why.push("the epoch's envelope is still in the store".into());
    }
    if why.is_empty() {
        why.push("see the shred.verify.end audit record".into());
    }
    format!(
        "{} (no certificate issued; a re-run verifies again)",
        why.join("; ")
    )
}

/// Step 6: build, anchor, sign and store the certificate; the tenant is shredded.
async fn certify(
    repo: &mut Repo,
    journal: &Journal,
    resumed_after: Option<ShredStep>,
) -> Result<ShredReport> {
    let ctx = repo.context().clone();
    let tenant = repo.tenant().clone();
    let id = journal.certificate_id.clone();
    let body = body(repo)?;
    super::confirm_before_signing(repo, &body, true, None).await?;
    let bytes = issue_certificate(&ctx, &tenant, journal, body).await?;
    let now = Utc::now();
    repo.update_descriptor(|d| {
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
    })
    .await?;
    tracing::info!(event = "shred.certified", tenant = %tenant, certificate_id = %id, "tenant shredded; certificate stored");
    ShredReport::new(&tenant, &id, bytes, false, resumed_after)
}

/// The certificate body, from the descriptor's records alone.
fn body(repo: &Repo) -> Result<Certificate> {
    let d = repo.descriptor();
    let state = d.shredding.as_ref().expect("shredding");
    let p = SLOT.progress(d)?;
    let scope = p.scope.clone().expect("scoped");
    let keys = p.keys.clone().expect("keys destroyed");
    let providers: Vec<&str> = keys.iter().map(|k| k.provider.as_str()).collect();
    Ok(Certificate {
        format: certificate::CERTIFICATE_FORMAT.into(),
        id: state.certificate_id.clone().expect("id"),
        subject: Subject::Tenant,
        tenant: d.tenant.clone(),
        epoch: None,
        reason: state.reason.clone(),
        requested_by: state.requested_by.clone(),
        actor: p.actor.clone(),
        requested_at: p.requested_at,
        started_at: state.started_at,
        executed_at: p.executed_at.unwrap_or(state.started_at),
        issued_at: Utc::now(),
        method: "cryptographic erase".into(),
        guarantee: match super::not_destroyed(&keys) {
            None => Guarantee {
                kind: GuaranteeKind::KeysDestroyed,
                statement: format!(
                    "Every key that wrapped the data keys of tenant {} (current, pending and previous CMKs) \
                     was destroyed; its data keys cannot be unwrapped, so all of its ciphertext, retained \
                     objects and any other copies included, is unrecoverable.",
                    d.tenant
                ),
                irreversible_at: super::irreversible_at(&keys),
                pending: pending_note(&keys),
            },
            Some(spared) => Guarantee {
                kind: GuaranteeKind::KeysPartlyDestroyed,
                statement: format!(
                    "The keys of tenant {} listed as destroyed were destroyed, and the envelopes in scope no \
                     longer unwrap (see verification). Not destroyed: {spared}, which the tenant's descriptor \
                     names but nothing proved to be its own key; any copy of an envelope once wrapped under \
                     it (an earlier object version, a backup of the store) can still be unwrapped while it lives.",
                    d.tenant
                ),
                irreversible_at: super::irreversible_at(&keys),
                pending: Some(super::spared_note(&keys, &spared)),
            },
        },
        algorithms: certificate::Algorithms::new(&providers),
        keys,
        scope: scope.into(),
        deletion: p.deletion.clone().expect("deleted"),
        rewrap: None,
        verification: p.verification.clone().expect("verified"),
        store: store_info(&repo.context().store_url),
        custos_version: env!("CARGO_PKG_VERSION").into(),
        audit: None,
    })
}

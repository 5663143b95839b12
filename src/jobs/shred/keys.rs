//! The keys of a shred: which keys the tenant owns, destroying those proven
//! its own (the `keys` step), and reading their state back for verification.

use chrono::{DateTime, Utc};

use crate::context::Context;
use crate::error::Result;
use crate::format::descriptor::Descriptor;
use crate::format::shred::{DestroyOutcome, KeyDestruction, KeyRole, KeyStateCheck};
use crate::keys::{Destruction, KeyError, KeyRef, KeyState};
use crate::repo::Repo;
use crate::repo::ownership::{self, KeyVerdict, Verdict};
use crate::tenant::TenantId;

use super::journal::{Journal, Slot, save};

/// The keys the descriptor names as the tenant's: the current CMK, the CMK a
/// rotation is moving to, and every CMK that wrapped envelopes before. A
/// tenant shred destroys each of them that is proven the tenant's.
///
/// Previous keys are destroyed too because their envelopes may survive:
/// re-wrapping replaces the envelope object, but a versioned bucket, a store
/// backup or a replica keeps the older version, wrapped under the old key, and
/// that copy unwraps to the same data key for as long as the old key lives.
/// Keys are never taken from the envelopes themselves: an envelope planted in
/// the store could name anyone's key. Nor is this list trusted: the
/// descriptor is unauthenticated, so [`ownership::decide_destroy`] proves each
/// key the tenant's (a key claim or envelope unwraps under it, or the key
/// registry says so) and checks that no other tenant uses it.
pub fn tenant_keys(d: &Descriptor) -> Vec<(KeyRef, KeyRole)> {
    let mut out: Vec<(KeyRef, KeyRole)> = vec![(d.key.clone(), KeyRole::Current)];
    if let Some(p) = &d.pending_key {
        out.push((p.clone(), KeyRole::Pending));
    }
    for k in d.previous_keys.iter().rev() {
        out.push((k.clone(), KeyRole::Previous));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|(k, _)| seen.insert(k.clone()));
    out
}

/// Every key a shred of the tenant must end: the keys its descriptor names
/// ([`tenant_keys`]) and every other key the tenant is known to own (the key
/// registry of this host, the tenant's own claims and envelopes:
/// [`ownership::known_keys`]), since the descriptor is unauthenticated and a
/// key dropped from it would outlive a certificate saying all were destroyed.
pub(super) async fn all_tenant_keys(repo: &Repo) -> Result<Vec<(KeyRef, KeyRole)>> {
    ownership::known_keys(repo.context(), repo.store(), tenant_keys(repo.descriptor())).await
}

/// Which of the tenant's keys a shred may destroy, decided before anything
/// starts so that a refusal (a key not proven the tenant's, or in use by
/// another tenant) leaves the tenant as it was. The keys step decides again.
pub(super) async fn decide_up_front(repo: &Repo, skip: &[KeyRef]) -> Result<Vec<KeyVerdict>> {
    let keys = all_tenant_keys(repo).await?;
    ownership::decide_destroy(repo.context(), repo.store(), &keys, skip, "shred").await
}

/// The `keys` step of every shred: decides again which of `keys` may be
/// destroyed (the descriptor may have changed since the shred began; a
/// refusal changes nothing), then destroys those, journalled.
pub(super) async fn destroy_keys_step(
    repo: &mut Repo,
    journal: &Journal,
    slot: Slot,
    keys: &[(KeyRef, KeyRole)],
) -> Result<Vec<KeyDestruction>> {
    let progress = slot.progress(repo.descriptor())?;
    let (window, skip) = (progress.pending_window_days, progress.skip_unproven.clone());
    let verdicts =
        ownership::decide_destroy(repo.context(), repo.store(), keys, &skip, "shred").await?;
    // When destruction began: custos's own clock reading, recorded in the
    // audit log (where the store cannot rewrite it) before the descriptor
    // and before the first destroy call. The certificate states the first
    // such record's reading, never the descriptor's copy.
    let now = crate::hooks::now();
    journal
        .begin(
            "keys",
            serde_json::json!({
                "keys": verdicts.iter().map(|v| serde_json::json!({
                    "key": v.key,
                    "role": v.role,
                    "decision": verdict_details(&v.verdict),
                })).collect::<Vec<_>>(),
                "pending_window_days": window,
                "keys_began_at": now,
            }),
        )
        .await?;
    if slot.progress(repo.descriptor())?.keys_began_at.is_none() {
        save(repo, slot, |p| p.keys_began_at = Some(now)).await?;
    }
    let repo: &Repo = repo;
    let ctx = repo.context();
    let destroyed = destroy_keys(ctx, repo.tenant(), &verdicts, window).await?;
    journal
        .end("keys", serde_json::json!({ "keys": destroyed }))
        .await?;
    Ok(destroyed)
}

/// A verdict as the audit log records it: what will be done, and why.
fn verdict_details(v: &Verdict) -> serde_json::Value {
    match v {
        Verdict::Destroy { proof } => {
            serde_json::json!({ "action": "destroy", "proof": proof.to_string() })
        }
        Verdict::AlreadyGone { state } => serde_json::json!({
            "action": "none",
            "why": "already destroyed or unknown to its provider; ownership not proven",
            "state": state.as_ref().map(|s| s.name()),
        }),
        Verdict::Skip { why } => serde_json::json!({
            "action": "none",
            "why": format!("left untouched (--skip-unproven-key): {why}"),
        }),
    }
}

/// Carries out the verdicts: destroys each key proven the tenant's (a key
/// the provider does not know is recorded as not found), and records the
/// others as they are, untouched. The registry marks destroyed keys.
async fn destroy_keys(
    ctx: &Context,
    tenant: &TenantId,
    verdicts: &[KeyVerdict],
    window_days: u32,
) -> Result<Vec<KeyDestruction>> {
    let mut out = Vec::new();
    for v in verdicts {
        let (key, role) = (&v.key, v.role);
        let record = |outcome, note: Option<String>| KeyDestruction {
            reference: key.clone(),
            provider: key.kind().scheme().into(),
            role,
            outcome,
            action: None,
            state_after: None,
            irreversible_at: None,
            note,
            custody: ctx.keys.key(key).ok().map(|k| k.custody()),
            objects: Vec::new(),
        };
        let not_found_note = "the provider does not know this key: deleted before (after its waiting period), or not reachable with this configuration";
        let d = match &v.verdict {
            Verdict::Skip { why } => {
                let d = record(
                    DestroyOutcome::NotDestroyed,
                    Some(format!(
                        "not destroyed: {why}; left untouched on the operator's request (--skip-unproven-key). \
                         Copies of envelopes once wrapped under it can be unwrapped while it lives"
                    )),
                );
                tracing::warn!(event = "shred.key_skipped", key = %key, role = ?role, "key {key} left untouched: ownership unproven");
                out.push(d);
                continue;
            }
            Verdict::AlreadyGone { state: None } => {
                record(DestroyOutcome::NotFound, Some(not_found_note.into()))
            }
            Verdict::AlreadyGone { state: Some(state) } => KeyDestruction {
                state_after: Some(state.clone()),
                ..record(
                    DestroyOutcome::AlreadyDestroyed,
                    Some(format!(
                        "the provider showed the key {} before this shred acted; its ownership was not proven, so custos did not touch it",
                        state.name()
                    )),
                )
            },
            Verdict::Destroy { .. } => {
                let cmk = ctx.keys.key(key)?;
                let multi_region = key.id().contains("mrk-").then(|| {
                    "multi-Region key: its replicas in other Regions are separate keys and must be deleted there too".to_owned()
                });
                match cmk.destroy(window_days).await {
                    Ok(d) => KeyDestruction {
                        outcome: DestroyOutcome::Destroyed,
                        action: Some(d.action),
                        irreversible_at: Some(completed_at(&d, crate::hooks::now())),
                        state_after: Some(d.state_after),
                        objects: d.objects,
                        ..record(DestroyOutcome::Destroyed, multi_region)
                    },
                    Err(KeyError::NotFound { .. }) if key.kind().absence_means_gone() => {
                        record(DestroyOutcome::NotFound, Some(not_found_note.into()))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if matches!(v.verdict, Verdict::Destroy { .. }) {
            ownership::record_destroyed(ctx, tenant, std::slice::from_ref(key))?;
        }
        tracing::info!(
            event = "shred.key_destroyed",
            key = %key,
            role = ?role,
            outcome = ?d.outcome,
            action = ?d.action,
            irreversible_at = d.irreversible_at.map(|t| t.to_rfc3339()),
            "key {key}: {:?}", d.outcome
        );
        out.push(d);
    }
    Ok(out)
}

/// When a destruction became irreversible, as a certificate states it.
/// A provider's `effective_at` may be when the destruction *began* (the
/// time in its destruction record, which a re-run after a crash reports
/// although versions were destroyed only now), so it is never earlier than
/// `returned_at`, the moment the destroy call that found no version left
/// returned. A later `effective_at` (a scheduled deletion) is kept.
pub(super) fn completed_at(d: &Destruction, returned_at: DateTime<Utc>) -> DateTime<Utc> {
    d.effective_at.max(returned_at)
}

/// Whether a key state shows the key can never be used again without its
/// owner undoing a scheduled deletion (which the certificate states).
pub(super) fn state_shows_destruction(state: &KeyState) -> bool {
    matches!(
        state,
        KeyState::PendingDeletion { .. } | KeyState::PendingImport | KeyState::Destroyed { .. }
    )
}

/// DescribeKey of each destroyed key, after the fact.
pub(super) async fn key_state_checks(
    ctx: &Context,
    keys: &[KeyDestruction],
) -> (Vec<KeyStateCheck>, bool) {
    let mut out = Vec::new();
    let mut ok = true;
    // A key left untouched is not claimed destroyed: nothing to check.
    for k in keys
        .iter()
        .filter(|k| k.outcome != DestroyOutcome::NotDestroyed)
    {
        let r = match ctx.keys.key(&k.reference) {
            Ok(p) => p.describe().await,
            Err(e) => Err(e),
        };
        out.push(match r {
            Ok(info) => {
                ok &= state_shows_destruction(&info.state);
                KeyStateCheck {
                    reference: k.reference.clone(),
                    state: Some(info.state),
                    error: None,
                }
            }
            Err(e) => {
                // Where absence is proof (a KMS key past its waiting period,
                // a token or key manager that lists none of its objects), a
                // key this shred destroyed or found gone reads as not found.
                ok &= matches!(e, KeyError::NotFound { .. })
                    && matches!(
                        k.outcome,
                        DestroyOutcome::NotFound | DestroyOutcome::Destroyed
                    )
                    && k.reference.kind().absence_means_gone();
                KeyStateCheck {
                    reference: k.reference.clone(),
                    state: None,
                    error: Some(e.to_string()),
                }
            }
        });
    }
    (out, ok)
}

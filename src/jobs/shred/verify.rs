//! The checks of the `verify` step: a shredded data key must no longer
//! unwrap, and a sampled pack must be gone or undecryptable.

use object_store::path::Path as StorePath;

use crate::context::Context;
use crate::error::Result;
use crate::format::envelope::Envelope;
use crate::format::shred::{DestroyOutcome, KeyDestruction, UnwrapCheck, VerificationRecord};
use crate::keys::KeyError;
use crate::repo::Repo;
use crate::store::ObjectName;

use super::keys::state_shows_destruction;

/// Whether the sampled pack (`tenants/<tenant>/packs/...` as the scope
/// recorded it) is still in the store.
pub(super) async fn sample_pack_present(repo: &Repo, object: &str) -> Result<bool> {
    let relative = object
        .strip_prefix(&format!("tenants/{}/", repo.tenant()))
        .unwrap_or(object);
    match ObjectName::parse(&StorePath::from(relative)) {
        Some(name) => Ok(repo.store().head(&name).await?.is_some()),
        None => Ok(false),
    }
}

/// An unwrap check's outcome when custos could not ask the key's provider.
pub(super) const NOT_TRIED: &str = "not_tried";

/// An unwrap check's outcome for an envelope under a key the shred left
/// untouched (`--skip-unproven-key`): not tried, and no failure, since the
/// certificate states that key was not destroyed (the envelope's copies may
/// unwrap while it lives); refusing here would leave the shred fenced for good.
pub(super) const KEY_NOT_DESTROYED: &str = "key_not_destroyed";

/// Splits the captured envelopes into those to try (under keys the shred
/// ended) and the checks of those under a key it left untouched.
pub(super) fn spared_envelopes(
    envelopes: &[Envelope],
    keys: &[KeyDestruction],
) -> (Vec<Envelope>, Vec<UnwrapCheck>) {
    let spared = |k: &crate::keys::KeyRef| {
        keys.iter()
            .any(|d| &d.reference == k && d.outcome == DestroyOutcome::NotDestroyed)
    };
    let (left, tried): (Vec<&Envelope>, Vec<&Envelope>) =
        envelopes.iter().partition(|e| spared(&e.key));
    let checks = left
        .into_iter()
        .map(|env| UnwrapCheck {
            epoch: env.epoch,
            key: env.key.clone(),
            outcome: KEY_NOT_DESTROYED.into(),
            error_kind: None,
            error: Some(format!(
                "not tried: {} was left untouched (see keys), so this envelope's data key is not claimed unrecoverable",
                env.key
            )),
        })
        .collect();
    (tried.into_iter().cloned().collect(), checks)
}

/// Tries to unwrap each captured envelope: every attempt must be refused.
/// A data key that does unwrap is dropped (zeroized) at once.
pub(super) async fn unwrap_checks(
    ctx: &Context,
    envelopes: &[Envelope],
) -> Result<(Vec<UnwrapCheck>, bool)> {
    let mut out = Vec::new();
    let mut ok = true;
    for env in envelopes {
        let cmk = ctx.keys.key(&env.key)?;
        match cmk.unwrap(&env.wrapped, &env.context()).await {
            Ok(data_key) => {
                drop(data_key);
                ok = false;
                out.push(UnwrapCheck {
                    epoch: env.epoch,
                    key: env.key.clone(),
                    outcome: "unwrapped".into(),
                    error_kind: None,
                    error: None,
                });
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            // Never tried (`[residency]` refused the call, no provider for
            // it): that proves nothing about the envelope, so it is no pass.
            Err(e @ (KeyError::Refused { .. } | KeyError::NotConfigured { .. })) => {
                ok = false;
                out.push(UnwrapCheck {
                    epoch: env.epoch,
                    key: env.key.clone(),
                    outcome: NOT_TRIED.into(),
                    error_kind: Some(e.kind().into()),
                    error: Some(e.to_string()),
                });
            }
            Err(e) => out.push(UnwrapCheck {
                epoch: env.epoch,
                key: env.key.clone(),
                outcome: "refused".into(),
                error_kind: Some(e.kind().into()),
                error: Some(e.to_string()),
            }),
        }
    }
    Ok((out, ok))
}

/// Why a verification failed, for the error and the operator.
pub(super) fn verification_failure(r: &VerificationRecord) -> String {
    let mut why = Vec::new();
    for c in r
        .envelopes
        .iter()
        .filter(|c| c.outcome != "refused" && c.outcome != KEY_NOT_DESTROYED)
    {
        why.push(match c.outcome.as_str() {
            NOT_TRIED => format!(
                "the data key of epoch {} could not be tried under {} ({}), so nothing shows it no longer unwraps",
                c.epoch,
                c.key,
                c.error.as_deref().unwrap_or("no reason given")
            ),
            _ => format!(
                "the data key of epoch {} still unwraps under {}",
                c.epoch, c.key
            ),
        });
    }
    for k in &r.key_states {
        match (&k.state, &k.error) {
            (Some(s), _) if !state_shows_destruction(s) => {
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

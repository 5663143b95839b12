//! A tenant's key envelopes as a rotation reads them: which must exist, each
//! checked to be this tenant's and this epoch's, and unwrapped against its
//! fingerprint.

use object_store::UpdateVersion;

use crate::error::{Error, Result};
use crate::format::envelope::Envelope;
use crate::keys::{DataKey, KeyRef};
use crate::repo::Repo;
use crate::store::ObjectName;

/// Envelopes to keep re-wrapped: every `keys/<n>` in the store whose epoch is
/// not shredded (including one left by an interrupted `--new-epoch`), and
/// every live epoch of the descriptor, which must have one. An epoch being
/// shredded is neither: its envelope is deleted, or retained by the store
/// and never to be written again.
pub(super) async fn epochs(repo: &Repo) -> Result<Vec<u32>> {
    let shredding = repo.descriptor().epoch_shred.as_ref().map(|e| e.epoch);
    let mut epochs = repo.unshredded_envelope_epochs().await?;
    epochs.retain(|e| Some(*e) != shredding);
    for e in repo.descriptor().live_epochs() {
        if Some(e.epoch) == shredding {
            continue;
        }
        if !epochs.contains(&e.epoch) {
            return Err(Error::missing(
                repo.store().display(&ObjectName::Envelope(e.epoch)),
                format!("the envelope of live epoch {} is gone", e.epoch),
            ));
        }
    }
    epochs.sort_unstable();
    Ok(epochs)
}

/// The envelope of `epoch` and the version a conditional replace must match.
pub(super) async fn read(repo: &Repo, epoch: u32) -> Result<(Envelope, UpdateVersion)> {
    let store = repo.store();
    let name = ObjectName::Envelope(epoch);
    let (bytes, meta) = store
        .get_if_exists(&name)
        .await?
        .ok_or_else(|| Error::missing(store.display(&name), "not found in the store"))?;
    let env = Envelope::parse(&bytes).map_err(|e| Error::corrupt(store.display(&name), e))?;
    if &env.tenant != repo.tenant() || env.epoch != epoch {
        return Err(Error::Foreign {
            object: store.display(&name),
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

/// Unwraps `env` under `under`; the data key must match the envelope's fingerprint.
pub(super) async fn unwrap_checked(repo: &Repo, env: &Envelope, under: &KeyRef) -> Result<DataKey> {
    let dk = repo
        .context()
        .keys
        .key(under)?
        .unwrap(&env.wrapped, &env.context())
        .await?;
    if dk.fingerprint() != env.fingerprint {
        return Err(Error::corrupt(
            repo.store().display(&ObjectName::Envelope(env.epoch)),
            "unwrapped key does not match the envelope's fingerprint",
        ));
    }
    Ok(dk)
}

/// Reads back every envelope and unwraps it under the key it names, which
/// must be the tenant's key: nothing may still depend on an old one.
/// Returns how many were verified.
pub(super) async fn verify_all(repo: &Repo) -> Result<usize> {
    let key = repo.descriptor().key.clone();
    let mut n = 0;
    for epoch in epochs(repo).await? {
        let (env, _) = read(repo, epoch).await?;
        if env.key != key {
            return Err(Error::Internal(format!(
                "after the rotation, {} is still wrapped under {} instead of {key}",
                repo.store().display(&ObjectName::Envelope(epoch)),
                env.key
            )));
        }
        unwrap_checked(repo, &env, &key).await?;
        n += 1;
    }
    Ok(n)
}

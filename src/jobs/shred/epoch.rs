//! Shredding one key epoch of an active tenant.
//!
//! Only a retired epoch none of whose snapshots remains can be shredded (the
//! current one cannot: roll a new epoch first). Its envelope, index files and
//! packs are deleted (what the store refuses is listed as retained). That
//! alone makes the epoch unreadable through this store, but the tenant's CMK
//! stays alive for the other epochs, so a copy of the envelope kept
//! elsewhere (an earlier object version, a store backup) would still unwrap:
//! the certificate then gives the weaker guarantee `envelope_deleted`.
//!
//! With a re-wrap, the other epochs' envelopes first move to a fresh key (a
//! new local key `<tenant>-<n>`, or with AWS KMS a key the customer created,
//! `--rewrap-to`), and then every key that ever wrapped this tenant's
//! envelopes is destroyed: no stale copy of the shredded epoch's envelope can
//! be unwrapped again, and the certificate gives `keys_destroyed`.
//!
//! Steps (each recorded before and after, resumable): fence (the shred
//! begins, the target key is fixed), scope, delete, [rewrap, keys], verify,
//! certificate.

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
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
use super::verify::{sample_pack_present, spared_envelopes, unwrap_checks, verification_failure};
use super::{Rewrap, ShredRequest, holds};
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, EpochShredState, EpochState, Lifecycle, ShredState};
use crate::format::envelope::Envelope;
use crate::format::seal::{HEADER_LEN, Header};
use crate::format::shred::{
    DeletionRecord, KeyDestruction, KeyRole, PackCheck, RewrapRecord, ScopeRecord, ShredStep,
    VerificationRecord,
};
use crate::jobs::deletion::{self, Announced};
use crate::keys::{KeyError, KeyRef, ProviderKind};
use crate::repo::Repo;
use crate::repo::ownership::{self, Depth};
use crate::store::layout::Dir;
use crate::store::lease::LeaseGuard;
use crate::store::tenant::Listed;
use crate::store::{ObjectName, TenantStore};

const SLOT: Slot = Slot::Epoch;
const HEADER_READS: usize = 8;

/// A shred of one retired epoch of an active tenant.
pub(super) struct EpochSubject<'a> {
    epoch: u32,
    /// As the operator asks (a resumed shred must be asked the same way).
    rewrap: Option<&'a Rewrap>,
    /// The deletion plan published before the delete step, removed after it.
    announced: Option<Announced>,
}

impl<'a> EpochSubject<'a> {
    pub(super) fn new(epoch: u32, rewrap: Option<&'a Rewrap>) -> Self {
        EpochSubject {
            epoch,
            rewrap,
            announced: None,
        }
    }
}

impl ShredSubject for EpochSubject<'_> {
    const SLOT: Slot = SLOT;

    fn epoch(&self) -> Option<u32> {
        Some(self.epoch)
    }

    async fn begin(&mut self, repo: &mut Repo, req: &ShredRequest) -> Result<Begun> {
        let (epoch, rewrap) = (self.epoch, self.rewrap);
        match situation(repo, epoch, rewrap)? {
            Situation::Resume(step) => {
                tracing::info!(event = "shred.resumed", tenant = %repo.tenant(), epoch, after_step = step.map(|s| s.as_str()), "resuming an interrupted epoch shred");
                Ok(Begun::Resumed(step))
            }
            Situation::Done(id) => Ok(Begun::Finished(Box::new(
                already_shredded(repo, epoch, id).await?,
            ))),
            Situation::New => {
                let target = preflight(repo, epoch, rewrap).await?;
                if target.is_some() {
                    // A re-wrap ends every old key.
                    decide_up_front(repo, &req.skip_unproven).await?;
                }
                start(repo, req, epoch, target).await?;
                Ok(Begun::Started)
            }
        }
    }

    /// With a re-wrap the other epochs move and every old key is destroyed;
    /// without, the key lives on for them.
    fn steps(&self, d: &Descriptor) -> Vec<Step> {
        let rewrap = d
            .epoch_shred
            .as_ref()
            .is_some_and(|e| e.rewrap_to.is_some());
        match rewrap {
            true => vec![
                Step::Scope,
                Step::Delete,
                Step::Rewrap,
                Step::Keys,
                Step::Verify,
            ],
            false => vec![Step::Scope, Step::Delete, Step::Verify],
        }
    }

    async fn run(
        &mut self,
        step: Step,
        repo: &mut Repo,
        journal: &Journal,
        lease: &LeaseGuard,
    ) -> Result<Progress> {
        let epoch = self.epoch;
        match step {
            Step::Scope => scope(repo, journal, epoch).await.map(Progress::Scoped),
            Step::Delete => {
                self.announced = Some(announce_deletion(repo, lease, epoch).await?);
                delete(repo, journal, epoch).await.map(Progress::Deleted)
            }
            Step::Rewrap => {
                let to = rewrap_target(repo)?;
                move_envelopes(repo, journal, epoch, &to)
                    .await
                    .map(Progress::Rewrapped)
            }
            Step::Keys => {
                let to = rewrap_target(repo)?;
                deletion::wait_before_destroying_keys(repo, "shred").await?;
                let keys = keys(repo, journal, &to).await?;
                Ok(Progress::KeysDestroyed {
                    keys,
                    at: crate::hooks::now(),
                })
            }
            Step::Verify => verify(repo, journal, epoch).await.map(Progress::Verified),
        }
    }

    fn on_recorded(&self, d: &mut Descriptor, p: &Progress) {
        match p {
            // The epoch is shredded once its objects are deleted.
            Progress::Deleted(record) => {
                let now = record.finished_at;
                if let Some(e) = d.epochs.iter_mut().find(|e| e.epoch == self.epoch) {
                    e.state = EpochState::Shredded;
                    e.shredded_at.get_or_insert(now);
                }
                if let Some(p) = SLOT.state_mut(d).and_then(|s| s.progress.as_mut()) {
                    p.executed_at.get_or_insert(now);
                }
            }
            // Every envelope is under the new key: it is the tenant's key now.
            Progress::Rewrapped(record) => {
                if d.key != record.to {
                    let old = std::mem::replace(&mut d.key, record.to.clone());
                    if !d.previous_keys.contains(&old) {
                        d.previous_keys.push(old);
                    }
                }
                d.pending_key = None;
            }
            _ => {}
        }
    }

    async fn after_recorded(&mut self, repo: &Repo, step: Step) -> Result<()> {
        match (step, self.announced.take()) {
            (Step::Delete, Some(announced)) => deletion::finish(repo, announced).await,
            _ => Ok(()),
        }
    }

    fn certificate(&self, repo: &Repo, r: &Records<'_>) -> Result<Certificate> {
        body(repo, r, self.epoch)
    }

    fn confirm_terms(&self, body: &Certificate) -> (bool, Option<KeyRef>) {
        let to = body.rewrap.as_ref().map(|r| r.to.clone());
        (to.is_some(), to)
    }

    fn finish(&self, d: &mut Descriptor, certificate_id: &str, _now: DateTime<Utc>) {
        d.epoch_shred = None;
        if let Some(e) = d.epochs.iter_mut().find(|e| e.epoch == self.epoch) {
            e.certificate_id = Some(certificate_id.to_owned());
        }
    }

    fn certified(&self, repo: &Repo, certificate_id: &str) {
        debug_assert_eq!(repo.descriptor().state, Lifecycle::Active);
        tracing::info!(event = "shred.certified", tenant = %repo.tenant(), epoch = self.epoch, certificate_id = %certificate_id, "epoch shredded; certificate stored");
    }
}

/// Where a shred of `epoch` stands before this run.
enum Situation {
    /// Interrupted after this step: the run resumes it.
    Resume(Option<ShredStep>),
    /// Shredded before, with this certificate.
    Done(Option<String>),
    /// Not begun.
    New,
}

/// Refuses a shred of `epoch` that cannot run now (the tenant not active,
/// no such epoch, another epoch's shred in progress, a resumed shred asked
/// differently), else says where it stands.
fn situation(repo: &Repo, epoch: u32, rewrap: Option<&Rewrap>) -> Result<Situation> {
    repo.require_active("epoch shred")?;
    let tenant = repo.tenant();
    let d = repo.descriptor();
    let Some(rec) = d.epoch(epoch) else {
        return Err(Error::NotFound {
            what: format!("epoch {epoch} of tenant {tenant}"),
        });
    };
    match &d.epoch_shred {
        Some(es) if es.epoch != epoch => Err(Error::InvalidArgument(format!(
            "a shred of epoch {} of tenant {tenant} is in progress: finish it first \
             (custos shred {tenant} --epoch {} --confirm {tenant})",
            es.epoch, es.epoch
        ))),
        Some(es) => {
            if es.rewrap_to.is_some() != rewrap.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "the interrupted shred of epoch {epoch} was started {} a re-wrap; re-run it the same way",
                    if es.rewrap_to.is_some() {
                        "with"
                    } else {
                        "without"
                    }
                )));
            }
            if let (Some(stored), Some(asked)) = (&es.rewrap_to, rewrap) {
                check_resumed_target(tenant, stored, asked)?;
            }
            Ok(Situation::Resume(
                es.shred.progress.as_ref().map(|p| p.step),
            ))
        }
        None if rec.state == EpochState::Shredded => {
            Ok(Situation::Done(rec.certificate_id.clone()))
        }
        None => Ok(Situation::New),
    }
}

/// What a shred of `epoch` would do now, refused where it would be.
pub(super) async fn preview(
    repo: &Repo,
    epoch: u32,
    rewrap: Option<&Rewrap>,
    req: &ShredRequest,
) -> Result<ShredPreview> {
    let mut p = ShredPreview::new(repo, Some(epoch));
    match situation(repo, epoch, rewrap)? {
        Situation::Resume(step) => p.resume(step),
        Situation::Done(id) => p.done(id),
        Situation::New => {
            let target = preflight(repo, epoch, rewrap).await?;
            if target.is_some() {
                p.keys(decide_up_front(repo, &req.skip_unproven).await?);
            }
            p.rewrap_to = target;
            p.scope(&epoch_objects(repo, epoch).await?);
        }
    }
    Ok(p)
}

/// The re-wrap target the shred recorded when it started.
fn rewrap_target(repo: &Repo) -> Result<KeyRef> {
    repo.descriptor()
        .epoch_shred
        .as_ref()
        .and_then(|e| e.rewrap_to.clone())
        .ok_or_else(|| missing(repo, "re-wrap target"))
}

async fn already_shredded(
    repo: &Repo,
    epoch: u32,
    id: Option<String>,
) -> Result<super::ShredReport> {
    let tenant = repo.tenant();
    let Some(id) = id else {
        return Err(Error::TenantState {
            tenant: tenant.to_string(),
            state: "epoch_shredded".into(),
            message: format!("epoch {epoch} is already shredded (no certificate recorded for it)"),
        });
    };
    // As for a tenant: reported only if it is this epoch's certificate and
    // what it states still holds (its keys destroyed, the envelope gone).
    holds::finished_report(
        repo,
        &id,
        Some(epoch),
        "epoch",
        |c| c.rewrap.is_some(),
        false,
    )
    .await
}

/// The re-wrap target an interrupted shred recorded comes from the store,
/// which anyone who can write it can edit: it is used only as the operator
/// asks again. `--rewrap-to K` must name it; `--rewrap` only accepts one of
/// the fresh local keys custos makes (`local:<tenant>-<n>`). Either way it is
/// bound to the tenant (and refused if another uses it) before anything moves.
fn check_resumed_target(tenant: &crate::TenantId, stored: &KeyRef, asked: &Rewrap) -> Result<()> {
    let fresh_local = || {
        stored.kind() == ProviderKind::Local
            && stored
                .id()
                .strip_prefix(&format!("{tenant}-"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match asked {
        Rewrap::To(k) if k != stored => Err(Error::InvalidArgument(format!(
            "the interrupted shred of tenant {tenant} re-wraps to {stored}, not {k}: re-run it with --rewrap-to {stored} \
             (the target is checked again: it must be a key no other tenant uses)"
        ))),
        Rewrap::FreshLocalKey if !fresh_local() => Err(Error::InvalidArgument(format!(
            "the interrupted shred of tenant {tenant} records the re-wrap target {stored}, which is not a fresh key \
             custos makes for --rewrap (local:{tenant}-<n>): refusing to move the tenant's data keys to it; \
             if you chose it, re-run with --rewrap-to {stored}"
        ))),
        _ => Ok(()),
    }
}

/// The checks before an epoch shred begins; returns the re-wrap target.
async fn preflight(repo: &Repo, epoch: u32, rewrap: Option<&Rewrap>) -> Result<Option<KeyRef>> {
    let d = repo.descriptor();
    let tenant = repo.tenant();
    if epoch == d.current_epoch {
        return Err(Error::InvalidArgument(format!(
            "epoch {epoch} is the current epoch of tenant {tenant}: it cannot be shredded. \
             Roll a new epoch first (key rotation), then shred epoch {epoch} once none of its snapshots is kept"
        )));
    }
    let needing: Vec<String> = objects_with_epoch(
        repo.store(),
        repo.store().list(Dir::Snapshots).await?,
        epoch,
        true,
    )
    .await
    .into_iter()
    .map(|l| match l.name {
        Some(ObjectName::Snapshot(id)) => id.short(),
        _ => l.path.to_string(),
    })
    .collect();
    if !needing.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "epoch {epoch} of tenant {tenant} is still needed by {} snapshot(s): {}. \
             Forget them first (custos forget {tenant} …, then custos prune {tenant})",
            needing.len(),
            needing.join(", ")
        )));
    }
    let Some(rewrap) = rewrap else {
        return Ok(None);
    };
    if let Some(p) = &d.pending_key {
        return Err(Error::InvalidArgument(format!(
            "a CMK replacement (to {p}) is in progress: finish it before a re-wrapping epoch shred"
        )));
    }
    let ctx = repo.context();
    let used = |k: &KeyRef| &d.key == k || d.previous_keys.contains(k);
    let to = match rewrap {
        Rewrap::FreshLocalKey => {
            if d.key.kind() != ProviderKind::Local {
                return Err(Error::InvalidArgument(format!(
                    "tenant {tenant} is under {}: custos cannot create a key there (the customer owns it); \
                     give --rewrap-to <KEY-REF>, a new key created for this tenant",
                    d.key
                )));
            }
            let mut n = 2u32;
            loop {
                let k = KeyRef::local(&format!("{tenant}-{n}"))
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                if !used(&k) {
                    match ctx.keys.key(&k)?.describe().await {
                        // A name no descriptor, registry entry or policy names either.
                        Err(KeyError::NotFound { .. })
                            if ownership::users(ctx, tenant, &k, Depth::Named)
                                .await?
                                .is_empty() =>
                        {
                            break k;
                        }
                        Err(KeyError::NotFound { .. })
                        | Ok(_)
                        | Err(KeyError::Destroyed { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                n += 1;
            }
        }
        Rewrap::To(k) => {
            if used(k) {
                return Err(Error::InvalidArgument(format!(
                    "{k} already wrapped this tenant's data keys (it would be destroyed): \
                     re-wrap to a key that never did"
                )));
            }
            // Bindable first: a key outside [residency] is never contacted.
            ownership::check_bindable(ctx, tenant, k, Depth::Authenticated).await?;
            let info = ctx.keys.key(k)?.describe().await?;
            if !info.state.is_usable() {
                return Err(Error::InvalidArgument(format!(
                    "{k} is {}, not enabled: it cannot take the re-wrapped envelopes",
                    info.state.name()
                )));
            }
            k.clone()
        }
    };
    Ok(Some(to))
}

/// Sealed objects (of `listed`) whose clear header names `epoch`. With
/// `unreadable_too`, also those whose header cannot be read (a caller that
/// must be conservative: they might be of that epoch).
async fn objects_with_epoch(
    store: &TenantStore,
    listed: Vec<Listed>,
    epoch: u32,
    unreadable_too: bool,
) -> Vec<Listed> {
    let tagged: Vec<(Listed, Option<u32>)> = futures::stream::iter(listed)
        .map(|l| async move {
            let e = match &l.name {
                Some(name) => store
                    .get_range(name, 0..HEADER_LEN as u64)
                    .await
                    .ok()
                    .and_then(|b| Header::peek_epoch(&b).ok()),
                None => None,
            };
            (l, e)
        })
        .buffer_unordered(HEADER_READS)
        .collect()
        .await;
    let mut out: Vec<Listed> = tagged
        .into_iter()
        .filter(|(_, e)| *e == Some(epoch) || (unreadable_too && e.is_none()))
        .map(|(l, _)| l)
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The epoch's objects: its envelope, and index files and packs sealed under it.
async fn epoch_objects(repo: &Repo, epoch: u32) -> Result<Vec<Listed>> {
    let listed = repo.list_objects().await?;
    let mut out: Vec<Listed> = listed
        .iter()
        .filter(|l| l.name == Some(ObjectName::Envelope(epoch)))
        .cloned()
        .collect();
    let sealed: Vec<Listed> = listed
        .into_iter()
        .filter(|l| {
            matches!(
                l.name,
                Some(ObjectName::Index(_)) | Some(ObjectName::Pack(_))
            )
        })
        .collect();
    out.extend(objects_with_epoch(repo.store(), sealed, epoch, false).await);
    Ok(out)
}

/// Before the epoch's objects go: publishes them in a deletion plan (readers
/// that start from now on leave them out) and waits for the readers that
/// started before. Still reading after `reader_wait`: fails `readers_active`
/// (retryable; the shred resumes here), nothing deleted.
async fn announce_deletion(
    repo: &Repo,
    lease: &LeaseGuard,
    epoch: u32,
) -> Result<crate::jobs::deletion::Announced> {
    let mut plan = crate::store::deletions::DeletionPlan::new(&repo.context().holder, "shred");
    for l in epoch_objects(repo, epoch).await? {
        match l.name {
            Some(ObjectName::Envelope(e)) => plan.envelopes.push(e),
            Some(ObjectName::Index(id)) => plan.index.push(id),
            Some(ObjectName::Pack(id)) => plan.packs.push(id),
            _ => {}
        }
    }
    let announced = crate::jobs::deletion::announce(repo, lease, plan).await?;
    if let crate::jobs::deletion::Readers::Busy { readers, waited } = &announced.readers {
        return Err(Error::ReadersActive {
            tenant: repo.tenant().to_string(),
            readers: readers.join(", "),
            waited: humantime::format_duration(std::time::Duration::from_secs(waited.as_secs()))
                .to_string(),
        });
    }
    Ok(announced)
}

/// Step 1: record the request and the re-wrap target in the descriptor.
async fn start(
    repo: &mut Repo,
    req: &ShredRequest,
    epoch: u32,
    rewrap_to: Option<KeyRef>,
) -> Result<()> {
    let ctx = repo.context().clone();
    let now = crate::hooks::now();
    let id = new_certificate_id(now);
    let progress = new_progress(req, now, ctx.actor.clone());
    ctx.record(
        "shred.fence.begin",
        Some(repo.tenant()),
        json!({
            "certificate_id": id,
            "started_at": now,
            "epoch": epoch,
            "reason": req.reason,
            "requested_by": req.requested_by,
            // What a certificate may state of the request is what is recorded here.
            "requested_at": progress.requested_at,
            "skip_unproven": progress.skip_unproven,
            "rewrap_to": rewrap_to,
            "key": repo.descriptor().key,
        }),
    )
    .await?;
    let state = EpochShredState {
        epoch,
        rewrap_to,
        shred: ShredState {
            started_at: now,
            finished_at: None,
            reason: req.reason.clone(),
            requested_by: req.requested_by.clone(),
            certificate_id: Some(id),
            progress: Some(progress),
        },
    };
    repo.update_descriptor(|d| d.epoch_shred = Some(state))
        .await?;
    let journal = Journal::new(repo, SLOT, Some(epoch))?;
    journal.crash("fence");
    journal
        .end(
            "fence",
            json!({ "generation": repo.descriptor().generation }),
        )
        .await?;
    Ok(())
}

async fn scope(repo: &Repo, journal: &Journal, epoch: u32) -> Result<ScopeRecord> {
    journal.begin("scope", json!({})).await?;
    let listed = epoch_objects(repo, epoch).await?;
    scope::record(repo, journal, &listed).await
}

/// Deletes the epoch's objects (the envelope first); see
/// [`EpochSubject::on_recorded`] for what the descriptor then records.
async fn delete(repo: &Repo, journal: &Journal, epoch: u32) -> Result<DeletionRecord> {
    let scope = scoped(repo, SLOT.progress(repo.descriptor())?)?;
    delete_in_scope(repo, journal, scope, |repo| {
        epoch_objects(repo, epoch).boxed()
    })
    .await
}

/// The epochs whose envelopes must move: every envelope in the store of an
/// epoch that is not shredded (one left by an interrupted `rotate --new-epoch`
/// included, as rotation counts them) and every live epoch of the descriptor.
async fn remaining_envelopes(repo: &Repo, shredded: u32) -> Result<Vec<u32>> {
    let mut epochs = repo.unshredded_envelope_epochs().await?;
    epochs.extend(repo.descriptor().live_epochs().map(|e| e.epoch));
    epochs.retain(|e| *e != shredded);
    epochs.sort_unstable();
    epochs.dedup();
    Ok(epochs)
}

/// Moves every remaining envelope to `to`, as `rotate --replace-cmk` does:
/// the descriptor names `to` as `pending_key` before the first envelope moves,
/// so at every point each envelope is under a key the descriptor names, both
/// alive; each moved envelope is unwrapped and checked against its fingerprint
/// before it replaces the old one (a conditional write).
async fn move_envelopes(
    repo: &mut Repo,
    journal: &Journal,
    epoch: u32,
    to: &KeyRef,
) -> Result<RewrapRecord> {
    let ctx = repo.context().clone();
    let from = repo.descriptor().key.clone();
    let epochs = remaining_envelopes(repo, epoch).await?;
    journal
        .begin(
            "rewrap",
            json!({ "from": from, "to": to, "epochs": epochs }),
        )
        .await?;
    let cmk = ctx.keys.key(to)?;
    match cmk.create().await {
        Ok(_) | Err(KeyError::Unsupported { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // The target becomes the tenant's key: proven already (a run interrupted
    // after binding it), or bound now, refused if another tenant uses it.
    if ownership::prove(&ctx, repo.store(), to, None)
        .await?
        .is_err()
    {
        ownership::bind(
            &ctx,
            repo.store(),
            to,
            "epoch-shred-rewrap",
            Depth::Authenticated,
        )
        .await?;
    }
    // The key moved away from is destroyed after the move, when no envelope
    // proves it the tenant's any more: a tenant made before key claims
    // existed gets its claim now, while its envelopes still prove it.
    ownership::ensure_claimed(&ctx, repo.store(), &from).await?;
    if repo.descriptor().pending_key.as_ref() != Some(to) {
        let pending = to.clone();
        repo.update_descriptor(|d| d.pending_key = Some(pending))
            .await?;
    }
    for (i, e) in epochs.iter().enumerate() {
        let name = ObjectName::Envelope(*e);
        let Some((_, meta)) = repo.store().get_if_exists(&name).await? else {
            return Err(Error::missing(
                repo.store().display(&name),
                "a live epoch has no envelope",
            ));
        };
        let env = repo.load_envelope(*e).await?;
        if &env.key == to {
            continue; // moved by an interrupted run
        }
        let wrapped = ctx
            .keys
            .rewrap(&env.key, &env.wrapped, &env.context(), to)
            .await?;
        let moved = Envelope {
            key: to.clone(),
            wrapped,
            rewrapped_at: Some(crate::hooks::now()),
            ..env.clone()
        };
        check_unwraps(repo, &moved).await?;
        let version = object_store::UpdateVersion {
            e_tag: meta.e_tag,
            version: meta.version,
        };
        repo.store()
            .put_conditional(
                &name,
                bytes::Bytes::from(moved.to_json()),
                object_store::PutMode::Update(version),
            )
            .await
            .map_err(|e| Error::store("put", repo.store().display(&name), e))?;
        if i == 0 {
            journal.crash("rewrap-partial");
        }
    }
    journal
        .end(
            "rewrap",
            json!({ "from": from, "to": to, "epochs": epochs }),
        )
        .await?;
    Ok(RewrapRecord {
        from: from.clone(),
        to: to.clone(),
        epochs,
        finished_at: crate::hooks::now(),
    })
}

/// A re-wrapped envelope must unwrap to the data key it held before.
async fn check_unwraps(repo: &Repo, env: &Envelope) -> Result<()> {
    let key = repo
        .context()
        .keys
        .key(&env.key)?
        .unwrap(&env.wrapped, &env.context())
        .await?;
    if key.fingerprint() != env.fingerprint {
        return Err(Error::corrupt(
            repo.store().display(&ObjectName::Envelope(env.epoch)),
            "the re-wrapped envelope unwraps to another key",
        ));
    }
    Ok(())
}

/// Destroys every key but `to` that ever wrapped this tenant's envelopes,
/// once every live envelope is confirmed under `to`.
async fn keys(repo: &mut Repo, journal: &Journal, to: &KeyRef) -> Result<Vec<KeyDestruction>> {
    let d = repo.descriptor().clone();
    let shredded = d.epoch_shred.as_ref().map(|e| e.epoch).unwrap_or(0);
    for e in remaining_envelopes(repo, shredded).await? {
        let env = repo.load_envelope(e).await?;
        if &env.key != to {
            return Err(Error::InvalidArgument(format!(
                "the envelope of epoch {e} is under {}, not {to}: refusing to destroy keys it needs",
                env.key
            )));
        }
    }
    let progress = SLOT.progress(&d)?;
    let from = progress.rewrap.as_ref().map(|r| r.from.clone());
    let mut candidates = all_tenant_keys(repo).await?;
    // The keys the shredded epoch's envelope was wrapped under, as the scope
    // found them (keys of the tenant then): the delete step removed the
    // envelope that named them, but they must be ended (or, on the
    // operator's word, left untouched and said so) like every other key.
    for e in progress.scope.iter().flat_map(|s| &s.captured) {
        if !candidates.iter().any(|(k, _)| k == &e.key) {
            candidates.push((e.key.clone(), KeyRole::Previous));
        }
    }
    let keys: Vec<(KeyRef, KeyRole)> = candidates
        .into_iter()
        .filter(|(k, _)| k != to)
        .map(|(k, _)| {
            let role = if Some(&k) == from.as_ref() {
                KeyRole::Current
            } else {
                KeyRole::Previous
            };
            (k, role)
        })
        .collect();
    // `to` is told apart by its spelling only (a KMS alias and its ARN are
    // one key): none of the keys ended may open a live envelope.
    for (k, _) in &keys {
        ownership::refuse_if_wrapping_live_envelopes(
            repo.context(),
            repo.store(),
            k,
            Some(shredded),
            "shred",
        )
        .await?;
    }
    destroy_keys_step(repo, journal, SLOT, &keys).await
}

async fn verify(repo: &Repo, journal: &Journal, epoch: u32) -> Result<VerificationRecord> {
    let ctx = repo.context();
    let progress = SLOT.progress(repo.descriptor())?;
    let scope = scoped(repo, progress)?;
    let rewrapped = progress.rewrap.is_some();
    journal
        .begin(
            "verify",
            json!({ "envelopes": scope.captured.len(), "rewrapped": rewrapped }),
        )
        .await?;
    let envelope_present = repo
        .store()
        .head(&ObjectName::Envelope(epoch))
        .await?
        .is_some();
    let (envelopes, key_states, mut passed) = if rewrapped {
        let keys = progress.keys.clone().unwrap_or_default();
        // As for a tenant: an envelope under a key the shred left untouched
        // is not tried (it may unwrap, or its provider may be one custos
        // must not call) and is no failure: the certificate says the key
        // lives on. Trying it would leave the shred fenced for good.
        let (to_try, spared) = spared_envelopes(&scope.captured, &keys);
        let (mut envelopes, refused) = unwrap_checks(ctx, &to_try).await?;
        envelopes.extend(spared);
        let (states, states_ok) = key_state_checks(ctx, &keys).await;
        // The remaining epochs must still unwrap under the new key.
        for e in repo.descriptor().live_epochs() {
            let env = repo.load_envelope(e.epoch).await?;
            check_unwraps(repo, &env).await?;
        }
        (envelopes, states, refused && states_ok)
    } else {
        // The key lives on for the other epochs: no unwrap is attempted (it
        // would succeed, by design); the guarantee is the envelope's deletion.
        let key = repo.descriptor().key.clone();
        let state = match ctx.keys.key(&key) {
            Ok(p) => p.describe().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let check = crate::format::shred::KeyStateCheck {
            reference: key,
            state: state.as_ref().ok().map(|i| i.state.clone()),
            error: state.err(),
        };
        (Vec::new(), vec![check], !envelope_present)
    };
    let pack_sample = scope.sample_pack.as_ref().map(|s| PackCheck {
        object: s.object.clone(),
        epoch: s.epoch,
        present: false,
        outcome: String::new(),
    });
    let pack_sample = match pack_sample {
        None => None,
        Some(mut p) => {
            p.present = sample_pack_present(repo, &p.object).await?;
            p.outcome = match (p.present, rewrapped) {
                (false, _) => "deleted".into(),
                (true, true) if envelopes.iter().all(|c| c.outcome == "refused") => {
                    "undecryptable".into()
                }
                (true, true) => "decryptable".into(),
                (true, false) => "envelope_deleted".into(),
            };
            Some(p)
        }
    };
    passed &= pack_sample
        .as_ref()
        .is_none_or(|p| p.outcome != "decryptable");
    let remaining = epoch_objects(repo, epoch).await?.len() as u64;
    let record = VerificationRecord {
        verified_at: crate::hooks::now(),
        passed,
        envelopes,
        pack_sample,
        key_states,
        remaining_objects: remaining,
        envelope_absent: (!rewrapped).then_some(!envelope_present),
    };
    journal
        .end("verify", serde_json::to_value(&record).unwrap_or_default())
        .await?;
    if !passed {
        let mut message = verification_failure(&record);
        if !rewrapped && envelope_present {
            message = format!(
                "the envelope of epoch {epoch} could not be deleted (the store retains it) and its key lives on: \
                 shred it with --rewrap, which destroys the key; {message}"
            );
        }
        return Err(Error::ShredVerification {
            tenant: repo.tenant().to_string(),
            message,
        });
    }
    Ok(record)
}

/// The certificate body, from the descriptor's records alone.
fn body(repo: &Repo, r: &Records<'_>, epoch: u32) -> Result<Certificate> {
    let d = repo.descriptor();
    let keys = r.progress.keys.clone().unwrap_or_default();
    let rewrap = r.progress.rewrap.clone();
    let wrapping_key = r
        .scope
        .captured
        .first()
        .map(|e| e.key.clone())
        .unwrap_or_else(|| d.key.clone());
    let mut providers: Vec<String> = keys.iter().map(|k| k.provider.clone()).collect();
    providers.push(wrapping_key.kind().scheme().to_owned());
    let guarantee = match &rewrap {
        Some(r) if not_destroyed(&keys).is_some() => {
            let spared = not_destroyed(&keys).unwrap_or_default();
            Guarantee::new(
                GuaranteeKind::KeysPartlyDestroyed,
                format!(
                    "The remaining epochs {:?} of tenant {} were re-wrapped under {} and the keys listed as \
                     destroyed were destroyed. Not destroyed: {spared}, which the tenant's descriptor names but \
                     nothing proved to be its own key; a copy of the envelope of epoch {epoch} once wrapped \
                     under it (an earlier object version, a backup of the store) could still be unwrapped \
                     while it lives.",
                    r.epochs, d.tenant, r.to
                ),
                Some(spared_note(&keys, &spared)),
            )
        }
        Some(r) => Guarantee::new(
            GuaranteeKind::KeysDestroyed,
            format!(
                "The data key of epoch {epoch} of tenant {} was wrapped only by keys that are now destroyed \
                 (the remaining epochs {:?} were first re-wrapped under {}): no copy of its envelope, \
                 wherever it survives, can be unwrapped, so the epoch's ciphertext, retained objects \
                 included, is unrecoverable.",
                d.tenant, r.epochs, r.to
            ),
            pending_note(&keys),
        ),
        None => Guarantee::new(
            GuaranteeKind::EnvelopeDeleted,
            format!(
                "The envelope of epoch {epoch} of tenant {} (its wrapped data key) was deleted from the \
                 store and the epoch is marked shredded. The key {wrapping_key}, which wrapped it, still \
                 protects the other epochs: a copy of the envelope kept elsewhere (an earlier object \
                 version, a backup of the store) would still unwrap while that key exists.",
                d.tenant
            ),
            Some(format!(
                "the erasure becomes independent of stale envelope copies once {wrapping_key} is destroyed: \
                 replace the tenant's CMK and destroy the old one (or shred the next epoch with --rewrap)"
            )),
        ),
    };
    let terms = SubjectTerms {
        subject: Subject::Epoch,
        epoch: Some(epoch),
        guarantee,
        providers,
        keys,
        rewrap,
    };
    Ok(certificate_body(repo, r, terms))
}

//! `shred`: verifiable crypto-shredding of a tenant, or of one key epoch, with
//! a signed deletion certificate (docs/shredding.md).
//!
//! A tenant shred runs these steps, each recorded in the audit log before
//! (`shred.<step>.begin`) and after (`shred.<step>.end`), each idempotent, each
//! storing its outcome in the descriptor before the next begins, so a re-run
//! after a crash at any point resumes where the last one stopped:
//!
//! 1. **fence**: the descriptor becomes `shredding`: no backup, restore, drill
//!    or new data key can start any more (checked under the tenant lease);
//! 2. **scope**: every object is listed; count, bytes and a Merkle root over
//!    (name, size, ETag) go to the audit log; the envelopes are captured;
//! 3. **keys**: every key that ever wrapped the tenant's data keys is destroyed
//!    (current, pending and previous CMKs: see [`tenant_keys`]);
//! 4. **delete**: envelopes, snapshots, index files and packs are deleted;
//!    what the store refuses to delete is listed as retained ciphertext;
//! 5. **verify**: unwrapping every captured envelope must now fail, the key
//!    states must show destruction, a sampled pack must be undecryptable;
//! 6. **certificate**: signed with the audit key, anchored in the audit log,
//!    stored under `certificates/<tenant>/<id>.json`; the tenant is `shredded`.
//!
//! An epoch shred ([`ShredTarget::Epoch`]) deletes one retired epoch's
//! envelope, index files and packs and, with a re-wrap, moves the other
//! epochs to a fresh key and destroys the old ones (see `epoch.rs`).
//!
//! For the daemon: [`due`] / [`daemon_decision`] / [`decide`] say whether the
//! deletion policy makes a shred due; [`ShredRequest::from_policy`] and
//! [`run_job`] run it.

pub mod certificate;
mod decision;
mod epoch;
pub mod hook;
pub mod scope;
mod tenant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

pub use certificate::{Certificate, CertificateError, GuaranteeKind, StoreInfo, Verified};
pub use decision::{ShredDecision, daemon_decision, decide, due};

use crate::audit::Receipt;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, ShredState};
use crate::format::envelope::Envelope;
use crate::format::shred::{
    DeletionRecord, DestroyOutcome, KeyDestruction, KeyRole, KeyStateCheck, RetainedObject,
    ScopeRecord, ShredProgress, ShredStep, UnwrapCheck,
};
use crate::jobs::runner::{self, JobRun, JobSpec};
use crate::keys::{KeyError, KeyRef, KeyState};
use crate::repo::Repo;
use crate::repo::ownership::{self, KeyVerdict, Verdict};
use crate::report::{JobKind, JobMetrics, JobOutput};
use crate::store::lease::LeaseGuard;
use crate::store::tenant::Listed;
use crate::store::{ObjectName, SharedStore, TenantStore};
use crate::tenant::TenantId;

/// What to shred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShredTarget {
    /// The whole tenant.
    Tenant,
    /// One retired epoch, optionally moving the other epochs to a fresh key.
    Epoch { epoch: u32, rewrap: Option<Rewrap> },
}

/// Where an epoch shred moves the remaining epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrap {
    /// A fresh local key `<tenant>-<n>` (local provider only).
    FreshLocalKey,
    /// A key the customer created (AWS KMS: custos cannot create one).
    To(KeyRef),
}

/// A shred request, from the CLI or the daemon.
#[derive(Debug, Clone)]
pub struct ShredRequest {
    pub target: ShredTarget,
    pub reason: String,
    pub requested_by: String,
    /// When the erasure was requested (policy `deletion.requested_at`); now if unset.
    pub requested_at: Option<DateTime<Utc>>,
    /// AWS KMS ScheduleKeyDeletion waiting period, 7..=30 days.
    pub pending_window_days: u32,
    /// The policy's legal hold: a shred under hold is refused.
    pub legal_hold: bool,
    /// Keys (of those the descriptor names as the tenant's) to leave
    /// untouched when their ownership cannot be proven, instead of refusing
    /// the shred (`--skip-unproven-key`). The certificate says they were not
    /// destroyed. A key that is proven the tenant's is destroyed regardless.
    pub skip_unproven: Vec<KeyRef>,
}

impl ShredRequest {
    /// The request the daemon makes for an offboarding tenant whose grace
    /// period is over (see [`due`]).
    pub fn from_policy(policy: &crate::config::Policy, actor: &str) -> Self {
        let d = &policy.deletion;
        ShredRequest {
            target: ShredTarget::Tenant,
            reason: match d.requested_at {
                Some(at) => format!(
                    "offboarding requested {} (policy {}), grace {} over",
                    at.to_rfc3339(),
                    policy.file.display(),
                    crate::config::units::format_duration(d.grace)
                ),
                None => format!("offboarding (policy {})", policy.file.display()),
            },
            requested_by: actor.to_owned(),
            requested_at: d.requested_at,
            pending_window_days: d.kms_pending_window_days,
            legal_hold: d.legal_hold,
            skip_unproven: Vec::new(),
        }
    }
}

/// The result of a shred run: the certificate and its headline facts.
#[derive(Debug, Clone, Serialize)]
pub struct ShredReport {
    pub tenant: TenantId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    pub certificate_id: String,
    /// Store path of the certificate, `certificates/<tenant>/<id>.json`.
    pub certificate_path: String,
    /// The shred had finished before this run: its certificate is returned.
    pub already_done: bool,
    /// The step an interrupted shred had reached when this run resumed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_after: Option<ShredStep>,
    pub guarantee: GuaranteeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irreversible_at: Option<DateTime<Utc>>,
    pub keys: Vec<KeyDestruction>,
    /// Epoch shred with a re-wrap: the tenant's key now (update its policy to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrapped_to: Option<KeyRef>,
    pub objects_deleted: u64,
    pub objects_retained: u64,
    /// The certificate document (parsed; verify the stored bytes, see `bytes`).
    pub certificate: serde_json::Value,
    /// The certificate file's exact bytes (what `certificate verify` checks).
    #[serde(skip)]
    pub certificate_bytes: Vec<u8>,
}

impl ShredReport {
    fn new(
        tenant: &TenantId,
        id: &str,
        bytes: Vec<u8>,
        already_done: bool,
        resumed_after: Option<ShredStep>,
    ) -> Result<Self> {
        let doc = certificate::parse_unverified(&bytes)
            .map_err(|e| Error::corrupt(certificate_path(tenant, id).to_string(), e.to_string()))?;
        let c = &doc.certificate;
        Ok(ShredReport {
            tenant: tenant.clone(),
            epoch: c.epoch,
            certificate_id: id.to_owned(),
            certificate_path: certificate_path(tenant, id).to_string(),
            already_done,
            resumed_after,
            guarantee: c.guarantee.kind,
            irreversible_at: c.guarantee.irreversible_at,
            keys: c.keys.clone(),
            rewrapped_to: c.rewrap.as_ref().map(|r| r.to.clone()),
            objects_deleted: c.deletion.objects_deleted,
            objects_retained: c.deletion.retained.len() as u64,
            certificate: serde_json::from_slice(&bytes).unwrap_or_default(),
            certificate_bytes: bytes,
        })
    }
}

impl JobOutput for ShredReport {
    fn metrics(&self) -> JobMetrics {
        let mut m = JobMetrics::default();
        m.gauges
            .insert("objects_deleted".into(), self.objects_deleted as f64);
        m.gauges
            .insert("objects_retained".into(), self.objects_retained as f64);
        m.gauges.insert(
            "keys_destroyed".into(),
            self.keys
                .iter()
                .filter(|k| k.outcome == DestroyOutcome::Destroyed)
                .count() as f64,
        );
        m
    }
}

/// Runs a shred inside an already held tenant lease (the runner's job body).
pub async fn run(repo: &Repo, lease: &LeaseGuard, req: &ShredRequest) -> Result<ShredReport> {
    let ctx = repo.context();
    if req.legal_hold {
        return Err(Error::LegalHold {
            tenant: repo.tenant().to_string(),
            message: "lift deletion.legal_hold in the tenant's policy first".into(),
        });
    }
    if ctx.audit.is_none() {
        return Err(Error::InvalidArgument(
            "shredding needs the audit log: it anchors and signs the deletion certificate".into(),
        ));
    }
    // Our own copy of the repository, read under the lease, that we may update.
    let mut repo = Repo::open(ctx, repo.tenant(), None).await?;
    let named = tenant_keys(repo.descriptor());
    if let Some(k) = req
        .skip_unproven
        .iter()
        .find(|k| !named.iter().any(|(n, _)| n == *k))
    {
        return Err(Error::InvalidArgument(format!(
            "--skip-unproven-key {k}: not a key tenant {} names (its keys: {})",
            repo.tenant(),
            named
                .iter()
                .map(|(k, _)| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    match &req.target {
        ShredTarget::Tenant => tenant::run(&mut repo, lease, req).await,
        ShredTarget::Epoch { epoch, rewrap } => {
            epoch::run(&mut repo, lease, req, *epoch, rewrap.as_ref()).await
        }
    }
}

/// The skip list of a shred: the request's, and what a run interrupted
/// earlier recorded (the operator's word stands for the re-run).
fn skip_list(req: &ShredRequest, recorded: Option<&ShredProgress>) -> Vec<KeyRef> {
    let mut out = req.skip_unproven.clone();
    for k in recorded
        .map(|p| p.skip_unproven.as_slice())
        .unwrap_or_default()
    {
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

/// Runs a shred as a job (lease, `shred.begin`/`shred.end` audit records,
/// events, job report): what the CLI and the daemon call.
pub async fn run_job(
    ctx: &Context,
    tenant: &TenantId,
    policy_key: Option<&KeyRef>,
    req: &ShredRequest,
) -> JobRun<ShredReport> {
    // An epoch shred with a re-wrap moves the tenant to its new key before it
    // is certified; until it is, the policy still names the old key (as
    // after `rotate --replace-cmk`), which must not stop a re-run finishing it.
    let policy_key = match policy_key {
        Some(k) if rewrap_in_progress_from(ctx, tenant, k).await => None,
        other => other,
    };
    let spec = JobSpec {
        tenant,
        job: JobKind::Shred,
        policy_key,
        init_with: None,
    };
    runner::run_job(ctx, spec, |repo, lease, _| run(repo, lease, req).boxed()).await
}

/// Whether an unfinished epoch shred re-wrapped the tenant from `old` to its current key.
async fn rewrap_in_progress_from(ctx: &Context, tenant: &TenantId, old: &KeyRef) -> bool {
    let Ok(repo) = Repo::open(ctx, tenant, None).await else {
        return false;
    };
    let d = repo.descriptor();
    d.previous_keys.contains(old)
        && d.epoch_shred
            .as_ref()
            .is_some_and(|e| e.rewrap_to.as_ref() == Some(&d.key))
}

/// Where a certificate is stored: outside every tenant prefix, so it outlives the tenant.
pub fn certificate_path(tenant: &TenantId, id: &str) -> StorePath {
    StorePath::from(format!("certificates/{tenant}/{id}.json"))
}

/// The stored bytes of a certificate, if it exists.
pub async fn load_certificate(
    store: &SharedStore,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<Vec<u8>>> {
    let path = certificate_path(tenant, id);
    match store.get(&path).await {
        Ok(r) => Ok(Some(
            r.bytes()
                .await
                .map_err(|e| Error::store("get", &path, e))?
                .to_vec(),
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::store("get", &path, e)),
    }
}

/// Ids of a tenant's certificates in the store, oldest first.
pub async fn list_certificates(store: &SharedStore, tenant: &TenantId) -> Result<Vec<String>> {
    use futures::TryStreamExt;
    let prefix = StorePath::from(format!("certificates/{tenant}"));
    let metas: Vec<object_store::ObjectMeta> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::store("list", &prefix, e))?;
    let mut ids: Vec<String> = metas
        .iter()
        .filter_map(|m| {
            m.location
                .filename()?
                .strip_suffix(".json")
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// A new certificate id: issue time and 64 random bits, `20260101T120000Z-1a2b3c4d5e6f7a8b`.
fn new_certificate_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%SZ"),
        hex::encode(crate::util::random_bytes::<8>())
    )
}

// ---------------------------------------------------------------------------
// Shared by the tenant and epoch shreds.

/// Where a shred's state lives in the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Tenant,
    Epoch,
}

impl Slot {
    fn hook_scope(self) -> &'static str {
        match self {
            Slot::Tenant => "shred",
            Slot::Epoch => "shred-epoch",
        }
    }

    fn state(self, d: &Descriptor) -> Option<&ShredState> {
        match self {
            Slot::Tenant => d.shredding.as_ref(),
            Slot::Epoch => d.epoch_shred.as_ref().map(|e| &e.shred),
        }
    }

    fn state_mut(self, d: &mut Descriptor) -> Option<&mut ShredState> {
        match self {
            Slot::Tenant => d.shredding.as_mut(),
            Slot::Epoch => d.epoch_shred.as_mut().map(|e| &mut e.shred),
        }
    }

    fn progress(self, d: &Descriptor) -> Result<&ShredProgress> {
        self.state(d)
            .and_then(|s| s.progress.as_ref())
            .ok_or_else(|| Error::Internal("shred progress missing from the descriptor".into()))
    }
}

/// Applies `f` to the shred's progress in the descriptor (conditional write).
async fn save(repo: &mut Repo, slot: Slot, f: impl FnOnce(&mut ShredProgress)) -> Result<()> {
    slot.progress(repo.descriptor())?;
    repo.update_descriptor(|d| {
        if let Some(p) = slot.state_mut(d).and_then(|s| s.progress.as_mut()) {
            f(p);
        }
    })
    .await
}

/// Audit records of one shred's steps, and its crash points.
struct Journal {
    ctx: Context,
    tenant: TenantId,
    epoch: Option<u32>,
    certificate_id: String,
    slot: Slot,
}

impl Journal {
    fn new(repo: &Repo, slot: Slot, epoch: Option<u32>) -> Result<Self> {
        let id = slot
            .state(repo.descriptor())
            .and_then(|s| s.certificate_id.clone())
            .ok_or_else(|| Error::Internal("shred without a certificate id".into()))?;
        Ok(Journal {
            ctx: repo.context().clone(),
            tenant: repo.tenant().clone(),
            epoch,
            certificate_id: id,
            slot,
        })
    }

    async fn record(&self, step: &str, phase: &str, details: serde_json::Value) -> Result<Receipt> {
        let mut details = details;
        if let serde_json::Value::Object(m) = &mut details {
            m.insert("certificate_id".into(), self.certificate_id.clone().into());
            if let Some(e) = self.epoch {
                m.insert("epoch".into(), e.into());
            }
        }
        self.ctx
            .record(
                &format!("shred.{step}.{phase}"),
                Some(&self.tenant),
                details,
            )
            .await?
            .ok_or_else(|| Error::Internal("no audit log".into()))
    }

    async fn begin(&self, step: &str, details: serde_json::Value) -> Result<Receipt> {
        tracing::info!(event = "shred.step", tenant = %self.tenant, epoch = self.epoch, step, phase = "begin", "shred of {}: {step}", self.tenant);
        self.record(step, "begin", details).await
    }

    async fn end(&self, step: &str, details: serde_json::Value) -> Result<Receipt> {
        let r = self.record(step, "end", details).await?;
        tracing::info!(event = "shred.step", tenant = %self.tenant, epoch = self.epoch, step, phase = "end", audit_seq = r.seq, "shred of {}: {step} done", self.tenant);
        Ok(r)
    }

    fn crash(&self, point: &str) {
        hook::crash_point(self.slot.hook_scope(), point);
    }
}

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
async fn all_tenant_keys(repo: &Repo) -> Result<Vec<(KeyRef, KeyRole)>> {
    ownership::known_keys(repo.context(), repo.store(), tenant_keys(repo.descriptor())).await
}

/// Before a certificate is signed, what it states must hold now, whatever
/// the descriptor's shred records (scope, keys, deletion, verification)
/// say: they are clear JSON in the store, and a store writer can fence a
/// tenant with records of a shred that never ran, so that a re-run skips
/// every step and signs. Each statement is checked against what the store
/// cannot forge: the scope is this shred's record in this installation's
/// audit log (the `shred.scope.end` its `audit_seq` names: tenant,
/// certificate id, count, bytes, root), and [`what_holds_now`]. Any mismatch
/// refuses the certificate (nothing is signed).
async fn confirm_before_signing(
    repo: &Repo,
    body: &Certificate,
    destroys_keys: bool,
    spared: Option<&KeyRef>,
) -> Result<()> {
    let ctx = repo.context();
    let tenant = repo.tenant();
    let mut problems = Vec::new();
    match body.scope.audit_seq {
        None => problems.push(
            "its scope names no audit record (every scope step records one): it cannot be checked"
                .into(),
        ),
        Some(seq) => {
            let audit = ctx.audit.as_ref().expect("checked at the start");
            let record = audit
                .read_lines(seq + 1)
                .ok()
                .and_then(|lines| lines.last().cloned())
                .and_then(|l| crate::audit::record::AuditRecord::from_line(&l).ok());
            let matches = record.as_ref().is_some_and(|r| {
                r.seq == seq
                    && r.event == "shred.scope.end"
                    && r.tenant.as_ref() == Some(tenant)
                    && r.details["certificate_id"] == body.id.as_str()
                    && r.details["merkle_root"] == body.scope.merkle_root.as_str()
                    && r.details["objects"] == body.scope.objects
                    && r.details["bytes"] == body.scope.bytes
                    && r.details.get("epoch").and_then(|e| e.as_u64()) == body.epoch.map(u64::from)
            });
            if !matches {
                problems.push(format!(
                    "its scope names audit record #{seq}, which is not the scope of this shred in this \
                     installation's audit log ({})",
                    match &record {
                        Some(r) => format!(
                            "#{seq} is {} of tenant {}",
                            r.event,
                            r.tenant.as_ref().map(|t| t.as_str()).unwrap_or("-")
                        ),
                        None => "no such record".into(),
                    }
                ));
            }
        }
    }
    problems.extend(what_holds_now(repo, body, destroys_keys, destroys_keys, spared).await?);
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::ShredVerification {
        tenant: tenant.to_string(),
        message: format!(
            "the shred records in the descriptor do not match what they claim: {} (no certificate issued: the \
             descriptor is not authenticated, and custos signs only what it can check; finish the shred on the \
             installation that began it, or find who edited tenants/{tenant}/tenant.json)",
            problems.join("; ")
        ),
    })
}

/// What a certificate states that can be checked now, from what the store
/// cannot forge (a certificate about to be signed, or the stored one a
/// `shredded` descriptor points to): every key listed as destroyed or gone
/// shows it at its provider (`destroys_keys`: false for an epoch shred
/// without re-wrap, whose key lives on by design); with `complete`, no key
/// the tenant is known to own ([`all_tenant_keys`], `spared` aside: an epoch
/// shred's re-wrap target) is missing from the list; the store holds nothing
/// of the subject but the retained ciphertext. Returns the problems found.
async fn what_holds_now(
    repo: &Repo,
    body: &Certificate,
    destroys_keys: bool,
    complete: bool,
    spared: Option<&KeyRef>,
) -> Result<Vec<String>> {
    let ctx = repo.context();
    let tenant = repo.tenant();
    let mut problems = Vec::new();
    if destroys_keys {
        for k in body
            .keys
            .iter()
            .filter(|k| k.outcome != DestroyOutcome::NotDestroyed)
        {
            let described = match ctx.keys.for_key(&k.reference) {
                Ok(p) => p.describe(&k.reference).await,
                Err(e) => Err(e),
            };
            let shown = match described {
                Ok(info) if state_shows_destruction(&info.state) => None,
                Ok(info) => Some(info.state.name()),
                // Deleted since (a KMS key after its waiting period); a
                // missing local key is not a destroyed one (its tombstone would be there).
                Err(KeyError::NotFound { .. }) if k.reference.kind().absence_means_gone() => None,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(now) = shown {
                problems.push(format!(
                    "key {} is listed as {} but its provider shows {now}",
                    k.reference,
                    serde_json::to_value(k.outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if complete {
        for (key, _) in all_tenant_keys(repo).await? {
            if Some(&key) != spared && !body.keys.iter().any(|k| k.reference == key) {
                problems.push(format!(
                    "key {key}, which the tenant is known to own, is not among the keys the shred ended"
                ));
            }
        }
    }
    let retained: Vec<&str> = body
        .deletion
        .retained
        .iter()
        .map(|r| r.object.as_str())
        .collect();
    let left: Vec<String> = match body.epoch {
        Some(e) => {
            let name = ObjectName::Envelope(e);
            let path = repo.store().display(&name);
            match repo.store().head(&name).await? {
                Some(_) if !retained.contains(&path.as_str()) => vec![path],
                _ => Vec::new(),
            }
        }
        None => repo
            .list_objects()
            .await?
            .into_iter()
            .filter(scope::in_tenant_scope)
            .map(|l| format!("tenants/{tenant}/{}", l.path))
            .filter(|p| !retained.contains(&p.as_str()))
            .collect(),
    };
    if let Some(first) = left.first() {
        problems.push(format!(
            "the store still holds {} object(s) the deletion record neither deleted nor retained (e.g. {first})",
            left.len()
        ));
    }
    Ok(problems)
}

/// A stored certificate is only this shred's if it says so: the store
/// writer can put any certificate custos signed (another tenant's, an
/// earlier lineage's) at the path a descriptor names. Checks the identity
/// only; the signature is checked where it matters (adoption) and by
/// `certificate verify`.
fn check_identity(
    c: &Certificate,
    tenant: &TenantId,
    id: &str,
    epoch: Option<u32>,
) -> std::result::Result<(), String> {
    let subject = match epoch {
        Some(_) => certificate::Subject::Epoch,
        None => certificate::Subject::Tenant,
    };
    if &c.tenant != tenant || c.id != id || c.subject != subject || c.epoch != epoch {
        return Err(format!(
            "the certificate stored there is {} of tenant {}{} (id {}), not this shred's ({} of tenant \
             {tenant}{}, id {id}): refusing to report it as this tenant's",
            subject_name(c.subject),
            c.tenant,
            c.epoch.map(|e| format!(" epoch {e}")).unwrap_or_default(),
            c.id,
            subject_name(subject),
            epoch.map(|e| format!(" epoch {e}")).unwrap_or_default(),
        ));
    }
    Ok(())
}

fn subject_name(s: certificate::Subject) -> &'static str {
    match s {
        certificate::Subject::Tenant => "a tenant shred",
        certificate::Subject::Epoch => "an epoch shred",
    }
}

/// The `keys` step of every shred: decides again which of `keys` may be
/// destroyed (the descriptor may have changed since the shred began; a
/// refusal changes nothing), then destroys those, journalled.
async fn destroy_keys_step(
    repo: &Repo,
    journal: &Journal,
    slot: Slot,
    keys: &[(KeyRef, KeyRole)],
) -> Result<Vec<KeyDestruction>> {
    let ctx = repo.context();
    let progress = slot.progress(repo.descriptor())?;
    let (window, skip) = (progress.pending_window_days, progress.skip_unproven.clone());
    let verdicts = ownership::decide_destroy(ctx, repo.store(), keys, &skip, "shred").await?;
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
            }),
        )
        .await?;
    let destroyed = destroy_keys(ctx, repo.tenant(), &verdicts, window).await?;
    journal
        .end("keys", serde_json::json!({ "keys": destroyed }))
        .await?;
    journal.crash("keys");
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
        Verdict::Skip => serde_json::json!({
            "action": "none",
            "why": "ownership not proven; left untouched (--skip-unproven-key)",
        }),
    }
}

/// Whether the sampled pack (`tenants/<tenant>/packs/...` as the scope
/// recorded it) is still in the store.
async fn sample_pack_present(repo: &Repo, object: &str) -> Result<bool> {
    let relative = object
        .strip_prefix(&format!("tenants/{}/", repo.tenant()))
        .unwrap_or(object);
    match ObjectName::parse(&StorePath::from(relative)) {
        Some(name) => Ok(repo.store().head(&name).await?.is_some()),
        None => Ok(false),
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
        };
        let not_found_note = "the provider does not know this key: deleted before (after its waiting period), or not reachable with this configuration";
        let d = match &v.verdict {
            Verdict::Skip => {
                let d = record(
                    DestroyOutcome::NotDestroyed,
                    Some(
                        "not destroyed: nothing proved this key the tenant's (no key claim or envelope of the tenant \
                         unwraps under it, and the key registry has no entry), so it may be another tenant's; \
                         left untouched on the operator's request (--skip-unproven-key). Copies of envelopes once \
                         wrapped under it can be unwrapped while it lives"
                            .to_owned(),
                    ),
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
                let provider = ctx.keys.for_key(key)?;
                let multi_region = key.id().contains("mrk-").then(|| {
                    "multi-Region key: its replicas in other Regions are separate keys and must be deleted there too".to_owned()
                });
                match provider.destroy(key, window_days).await {
                    Ok(d) => KeyDestruction {
                        outcome: DestroyOutcome::Destroyed,
                        action: Some(d.action),
                        state_after: Some(d.state_after),
                        irreversible_at: Some(d.effective_at),
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

/// Whether a key state shows the key can never be used again without its
/// owner undoing a scheduled deletion (which the certificate states).
fn state_shows_destruction(state: &KeyState) -> bool {
    matches!(
        state,
        KeyState::PendingDeletion { .. } | KeyState::PendingImport | KeyState::Destroyed { .. }
    )
}

/// DescribeKey of each destroyed key, after the fact.
async fn key_state_checks(ctx: &Context, keys: &[KeyDestruction]) -> (Vec<KeyStateCheck>, bool) {
    let mut out = Vec::new();
    let mut ok = true;
    // A key left untouched is not claimed destroyed: nothing to check.
    for k in keys
        .iter()
        .filter(|k| k.outcome != DestroyOutcome::NotDestroyed)
    {
        let r = match ctx.keys.for_key(&k.reference) {
            Ok(p) => p.describe(&k.reference).await,
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
                ok &= matches!(e, KeyError::NotFound { .. })
                    && k.outcome == DestroyOutcome::NotFound
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

/// Tries to unwrap each captured envelope: every attempt must be refused.
/// A data key that does unwrap is dropped (zeroized) at once.
async fn unwrap_checks(ctx: &Context, envelopes: &[Envelope]) -> Result<(Vec<UnwrapCheck>, bool)> {
    let mut out = Vec::new();
    let mut ok = true;
    for env in envelopes {
        let provider = ctx.keys.for_key(&env.key)?;
        match provider
            .unwrap(&env.key, &env.wrapped, &env.context())
            .await
        {
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

/// Deletes objects in the order envelopes, snapshots, index files, packs,
/// others; returns those the store refused to delete. `partial` is the crash
/// point reached halfway.
async fn delete_objects(
    store: &TenantStore,
    mut objects: Vec<Listed>,
    journal: &Journal,
    partial: &str,
) -> Result<Vec<RetainedObject>> {
    fn rank(name: &Option<ObjectName>) -> u8 {
        match name {
            Some(ObjectName::Envelope(_)) => 0,
            Some(ObjectName::Snapshot(_)) => 1,
            Some(ObjectName::Index(_)) => 2,
            Some(ObjectName::Pack(_)) => 3,
            _ => 4,
        }
    }
    objects.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)).then(a.path.cmp(&b.path)));
    let half = objects.len() / 2;
    let mut retained = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if i == half && half > 0 {
            journal.crash(partial);
        }
        match store.delete_path(&o.path).await {
            Ok(()) => {}
            Err(e) => match refusal(&e) {
                Some(reason) => retained.push(RetainedObject {
                    object: format!("tenants/{}/{}", store.tenant(), o.path),
                    size: o.meta.size,
                    retain_until: None,
                    reason,
                }),
                None => return Err(e),
            },
        }
    }
    Ok(retained)
}

/// The `delete` step of every shred: deletes what `in_scope` lists, then
/// lists again, since whatever is still listed was not deleted, whatever the
/// store answered. Journals the step; returns the record for the descriptor.
async fn delete_in_scope(
    repo: &Repo,
    journal: &Journal,
    scope: &ScopeRecord,
    in_scope: impl for<'r> Fn(&'r Repo) -> futures::future::BoxFuture<'r, Result<Vec<Listed>>>,
) -> Result<DeletionRecord> {
    let listed = in_scope(repo).await?;
    journal
        .begin("delete", serde_json::json!({ "objects": listed.len() }))
        .await?;
    let mut retained = delete_objects(repo.store(), listed, journal, "delete-partial").await?;
    for l in in_scope(repo).await? {
        let path = format!("tenants/{}/{}", repo.tenant(), l.path);
        if !retained.iter().any(|r| r.object == path) {
            retained.push(RetainedObject {
                object: path,
                size: l.meta.size,
                retain_until: None,
                reason: "still listed after the store accepted its deletion".into(),
            });
        }
    }
    let retained_bytes: u64 = retained.iter().map(|r| r.size).sum();
    let record = DeletionRecord {
        finished_at: Utc::now(),
        objects_deleted: scope.objects.saturating_sub(retained.len() as u64),
        bytes_deleted: scope.bytes.saturating_sub(retained_bytes),
        retained,
        note: store_note(&repo.context().store_url),
    };
    journal
        .end(
            "delete",
            serde_json::json!({
                "objects_deleted": record.objects_deleted,
                "bytes_deleted": record.bytes_deleted,
                "retained": record.retained.iter().take(100).map(|r| &r.object).collect::<Vec<_>>(),
                "retained_count": record.retained.len(),
            }),
        )
        .await?;
    journal.crash("delete");
    Ok(record)
}

/// The store refused the delete for good (Object Lock, permissions), as
/// opposed to failing transiently (which fails the step, for a re-run).
fn refusal(e: &Error) -> Option<String> {
    match e {
        Error::Store { source, .. } => match source {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. } => Some(format!(
                "the store refused the delete (Object Lock retention or permissions): {source}"
            )),
            _ => None,
        },
        _ => None,
    }
}

/// The store as a certificate names it.
fn store_info(url: &str) -> StoreInfo {
    StoreInfo {
        url: url.to_owned(),
        note: store_note(url),
    }
}

/// What the store may keep beyond its listing.
fn store_note(url: &str) -> Option<String> {
    url.starts_with("s3://").then(|| {
        "S3: in a versioned bucket a delete only adds a delete marker, and earlier versions \
         (under Object Lock, until their retain-until date) remain; they are ciphertext under \
         the destroyed keys and are not listed here (the store API used does not list versions)"
            .to_owned()
    })
}

/// The `certificate` step of every shred: signs `body` (anchored in the
/// audit log), stores it create-only (or adopts the one a previous run
/// stored) and journals the step's end. Returns the file's bytes.
async fn issue_certificate(
    ctx: &Context,
    tenant: &TenantId,
    journal: &Journal,
    body: Certificate,
) -> Result<Vec<u8>> {
    let id = journal.certificate_id.as_str();
    let bytes = store_certificate(ctx, tenant, id, body, journal).await?;
    journal.crash("certificate");
    journal
        .end(
            "certificate",
            serde_json::json!({
                "path": certificate_path(tenant, id).to_string(),
                "file_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            }),
        )
        .await?;
    Ok(bytes)
}

/// Stores the certificate (create-only) or adopts one a previous run stored.
/// Returns the file's bytes.
async fn store_certificate(
    ctx: &Context,
    tenant: &TenantId,
    id: &str,
    body: Certificate,
    journal: &Journal,
) -> Result<Vec<u8>> {
    let audit = ctx.audit.as_ref().expect("checked at the start");
    let own_key = audit.key().public_key_text();
    let body_epoch = body.epoch;
    let (body_scope, body_keys) = (body.scope.clone(), body.keys.clone());
    let adopt = |bytes: Vec<u8>| -> Result<Vec<u8>> {
        let verified = certificate::verify(&bytes, &own_key).map_err(|e| {
            Error::corrupt(
                certificate_path(tenant, id).to_string(),
                format!("a certificate with this shred's id is stored but does not verify: {e}"),
            )
        })?;
        check_identity(&verified.certificate, tenant, id, body_epoch)
            .map_err(|why| Error::corrupt(certificate_path(tenant, id).to_string(), why))?;
        // Same tenant and id is not the same shred: the id comes from the
        // descriptor, which a store writer can set to an earlier lineage's
        // (after `tenant init --allow-reuse`), whose certificate then sits
        // at this path. Adopted only when it states this run's scope (its
        // audit record is this run's) and these keys' outcomes.
        let stored = &verified.certificate;
        if stored.scope != body_scope || stored.keys != body_keys {
            return Err(Error::corrupt(
                certificate_path(tenant, id).to_string(),
                format!(
                    "the certificate stored there states another shred (scope of audit record {:?}, keys {}), \
                     not this one (scope of audit record {:?}, keys {}): refusing to report it as this \
                     shred's; the descriptor's certificate id was reused",
                    stored.scope.audit_seq,
                    key_list(&stored.keys),
                    body_scope.audit_seq,
                    key_list(&body_keys),
                ),
            ));
        }
        Ok(bytes)
    };
    if let Some(bytes) = load_certificate(&ctx.store, tenant, id).await? {
        return adopt(bytes);
    }
    let bytes = anchor_and_sign(ctx, journal, body).await?;
    journal.crash("certificate-signed");
    let path = certificate_path(tenant, id);
    let put = ctx
        .store
        .put_opts(
            &path,
            PutPayload::from_bytes(Bytes::from(bytes.clone())),
            PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            },
        )
        .await;
    match put {
        Ok(_) => Ok(bytes),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let stored = load_certificate(&ctx.store, tenant, id)
                .await?
                .ok_or_else(|| Error::missing(path.to_string(), "vanished after a conflict"))?;
            adopt(stored)
        }
        Err(e) => Err(Error::store("put", &path, e)),
    }
}

fn key_list(keys: &[KeyDestruction]) -> String {
    let names: Vec<String> = keys.iter().map(|k| k.reference.to_string()).collect();
    format!("[{}]", names.join(", "))
}

/// Anchors a body in the audit log (`shred.certificate.begin` with its digest),
/// adds the inclusion evidence and signs it.
async fn anchor_and_sign(
    ctx: &Context,
    journal: &Journal,
    mut body: Certificate,
) -> Result<Vec<u8>> {
    let audit = ctx.audit.as_ref().expect("checked at the start");
    body.audit = None;
    let digest = certificate::body_digest(&body);
    let receipt = journal
        .begin(
            "certificate",
            serde_json::json!({
                "certificate_sha256": digest,
                "path": certificate_path(&body.tenant, &body.id).to_string(),
                "guarantee": body.guarantee.kind,
                "irreversible_at": body.guarantee.irreversible_at,
                "scope_root": body.scope.merkle_root,
                "keys": body.keys.iter().map(|k| k.reference.to_string()).collect::<Vec<_>>(),
            }),
        )
        .await?;
    let evidence = audit.evidence(receipt.seq)?;
    body.audit = Some(certificate::AuditAnchor {
        event: certificate::ANCHOR_EVENT.into(),
        seq: receipt.seq,
        leaf_hash: hex::encode(receipt.leaf_hash),
        body_sha256: digest,
        evidence,
    });
    Ok(certificate::sign(&body, audit.key()))
}

/// The keys a shred left untouched (ownership unproven), for the guarantee.
fn not_destroyed(keys: &[KeyDestruction]) -> Option<String> {
    let spared: Vec<String> = keys
        .iter()
        .filter(|k| k.outcome == DestroyOutcome::NotDestroyed)
        .map(|k| k.reference.to_string())
        .collect();
    (!spared.is_empty()).then(|| spared.join(", "))
}

/// `guarantee.pending` of a certificate with keys left untouched.
fn spared_note(keys: &[KeyDestruction], spared: &str) -> String {
    let mut note = format!(
        "not destroyed, ownership unproven: {spared}. Once it is established that they were this tenant's \
         keys alone, destroy them with their provider; until then the erasure does not cover copies of \
         envelopes wrapped under them"
    );
    if let Some(p) = pending_note(keys) {
        note = format!("{note}. {p}");
    }
    note
}

/// The latest instant after which no destruction can be undone.
fn irreversible_at(keys: &[KeyDestruction]) -> Option<DateTime<Utc>> {
    keys.iter().filter_map(|k| k.irreversible_at).max()
}

/// What is pending while a scheduled key deletion can still be cancelled.
fn pending_note(keys: &[KeyDestruction]) -> Option<String> {
    let scheduled: Vec<&KeyDestruction> = keys
        .iter()
        .filter(|k| k.action == Some(crate::keys::DestroyAction::DeletionScheduled))
        .collect();
    let last = scheduled.iter().filter_map(|k| k.irreversible_at).max()?;
    Some(format!(
        "{} key(s) are disabled and pending deletion until {}: until then the key's owner could cancel the deletion \
         (CancelKeyDeletion); after that date the erasure is irreversible",
        scheduled.len(),
        last.to_rfc3339()
    ))
}

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
//! One engine (`engine::drive`) runs both: the tenant and the epoch are
//! subjects (`engine::ShredSubject`) that say what each step does; the
//! driver owns the order, the resumption, the crash points and the
//! descriptor writes. Each shared part is a module of its own: `journal`,
//! `keys`, `delete`, `verify`, `holds` (what a certificate states, checked),
//! `issue` (the certificate step and store).
//!
//! For the daemon: [`due`] / [`daemon_decision`] / [`decide`] say whether the
//! deletion policy makes a shred due; [`ShredRequest::from_policy`] and
//! [`run_job`] run it.

pub mod certificate;
mod decision;
mod delete;
mod engine;
mod epoch;
mod holds;
pub mod hook;
mod issue;
mod journal;
mod keys;
mod preview;
pub mod scope;
mod tenant;
mod verify;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde::Serialize;

pub use certificate::{Certificate, CertificateError, GuaranteeKind, StoreInfo, Verified};
pub use decision::{ShredDecision, daemon_decision, decide, due};
pub use issue::{certificate_path, list_certificates, load_certificate};
pub use keys::tenant_keys;
pub use preview::{KeyFate, PlannedKey, PreviewState, ShredPreview};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::shred::{DestroyOutcome, KeyDestruction, ShredProgress, ShredStep};
use crate::jobs::runner::{self, JobRun, JobSpec};
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::report::{JobKind, JobMetrics, JobOutput};
use crate::store::lease::LeaseGuard;
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
        return Err(legal_hold(repo.tenant()));
    }
    if ctx.audit.is_none() {
        return Err(Error::InvalidArgument(
            "shredding needs the audit log: it anchors and signs the deletion certificate".into(),
        ));
    }
    // Our own copy of the repository, read under the lease, that we may update.
    let mut repo = Repo::open(ctx, repo.tenant(), None).await?;
    check_skip_list(&repo, req).await?;
    match &req.target {
        ShredTarget::Tenant => engine::drive(tenant::TenantSubject, &mut repo, lease, req).await,
        ShredTarget::Epoch { epoch, rewrap } => {
            let subject = epoch::EpochSubject::new(*epoch, rewrap.as_ref());
            engine::drive(subject, &mut repo, lease, req).await
        }
    }
}

/// What `req` would do now (`shred --dry-run`): refused where the shred
/// would be, with nothing fenced, destroyed or deleted, and no lease taken.
pub async fn preview(
    ctx: &Context,
    tenant: &TenantId,
    policy_key: Option<&KeyRef>,
    req: &ShredRequest,
) -> Result<ShredPreview> {
    if req.legal_hold {
        return Err(legal_hold(tenant));
    }
    let policy_key = match policy_key {
        Some(k) if rewrap_in_progress_from(ctx, tenant, k).await => None,
        other => other,
    };
    let repo = Repo::open(ctx, tenant, policy_key).await?;
    check_skip_list(&repo, req).await?;
    match &req.target {
        ShredTarget::Tenant => tenant::preview(&repo, req).await,
        ShredTarget::Epoch { epoch, rewrap } => {
            epoch::preview(&repo, *epoch, rewrap.as_ref(), req).await
        }
    }
}

fn legal_hold(tenant: &TenantId) -> Error {
    Error::LegalHold {
        tenant: tenant.to_string(),
        message: "lift deletion.legal_hold in the tenant's policy first".into(),
    }
}

/// `--skip-unproven-key` may name only keys the tenant names, or that one of
/// its objects names and that could not be ruled out ([`keys::all_tenant_keys`]).
async fn check_skip_list(repo: &Repo, req: &ShredRequest) -> Result<()> {
    let mut named = keys::tenant_keys(repo.descriptor());
    if req
        .skip_unproven
        .iter()
        .any(|k| !named.iter().any(|(n, _)| n == k))
    {
        named = keys::all_tenant_keys(repo).await?;
    }
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
    Ok(())
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

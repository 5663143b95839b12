//! The certificate of a shred: where certificates are stored, and the
//! `certificate` step (anchor in the audit log, sign, store create-only or
//! adopt the one an interrupted run stored), with the guarantee texts.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::audit::AuditLog;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::shred::{DestroyOutcome, KeyDestruction, RewrapRecord};
use crate::repo::Repo;
use crate::store::SharedStore;
use crate::tenant::TenantId;

use super::certificate::{self, Certificate, Guarantee, StoreInfo, Subject};
use super::delete::store_note;
use super::engine::Records;
use super::holds::check_identity;
use super::journal::Journal;

/// The audit log, which every shred needs ([`super::run`] refuses to start
/// without one): it anchors and signs the certificate.
pub(super) fn audit_log(ctx: &Context) -> Result<&AuditLog> {
    ctx.audit.as_ref().ok_or_else(|| {
        Error::InvalidArgument(
            "shredding needs the audit log: it anchors and signs the deletion certificate".into(),
        )
    })
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
pub(super) fn new_certificate_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%SZ"),
        hex::encode(crate::util::random_bytes::<8>())
    )
}

/// The store as a certificate names it.
fn store_info(url: &str) -> StoreInfo {
    StoreInfo {
        url: url.to_owned(),
        note: store_note(url),
    }
}

/// The `certificate` step of every shred: signs `body` (anchored in the
/// audit log), stores it create-only (or adopts the one a previous run
/// stored) and journals the step's end. Returns the file's bytes.
///
/// With `ended` (the shred's audit records end in a `shred.certificate.end`
/// recording a file of that SHA-256): only that stored file is adopted;
/// nothing is signed and nothing recorded again.
pub(super) async fn issue_certificate(
    ctx: &Context,
    tenant: &TenantId,
    journal: &Journal,
    body: Certificate,
    ended: Option<&str>,
) -> Result<Vec<u8>> {
    let id = journal.certificate_id.as_str();
    if let Some(digest) = ended {
        return adopt_recorded(ctx, tenant, id, body, digest).await;
    }
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

/// The certificate a killed run stored and recorded, adopted when the file
/// in the store is the one its `shred.certificate.end` records (`digest`)
/// and states this shred; otherwise refused, never signed again.
async fn adopt_recorded(
    ctx: &Context,
    tenant: &TenantId,
    id: &str,
    body: Certificate,
    digest: &str,
) -> Result<Vec<u8>> {
    let refuse = |why: String| Error::ShredVerification {
        tenant: tenant.to_string(),
        message: format!(
            "this shred's audit records end in its certificate {id} (shred.certificate.end, file SHA-256 \
             {digest}), {why}; custos does not sign again a shred its own audit log records as certified \
             (put that file back from a copy to finish, or find who changed tenants/{tenant}/tenant.json)"
        ),
    };
    let path = certificate_path(tenant, id);
    let Some(bytes) = load_certificate(&ctx.store, tenant, id).await? else {
        return Err(refuse(format!("but {path} is not in the store")));
    };
    let stored = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    if stored != digest {
        return Err(refuse(format!(
            "but {path} holds another file (SHA-256 {stored})"
        )));
    }
    adopt(ctx, tenant, id, &body, bytes)
}

/// A stored certificate of this id, if it verifies under this
/// installation's audit key and states this very shred. Returns its bytes.
fn adopt(
    ctx: &Context,
    tenant: &TenantId,
    id: &str,
    body: &Certificate,
    bytes: Vec<u8>,
) -> Result<Vec<u8>> {
    let own_key = audit_log(ctx)?.key().public_key_text();
    let verified = certificate::verify(&bytes, &own_key).map_err(|e| {
        Error::corrupt(
            certificate_path(tenant, id).to_string(),
            format!("a certificate with this shred's id is stored but does not verify: {e}"),
        )
    })?;
    check_identity(&verified.certificate, tenant, id, body.epoch)
        .map_err(|why| Error::corrupt(certificate_path(tenant, id).to_string(), why))?;
    // Same tenant and id is not the same shred: the id comes from the
    // descriptor, which a store writer can set to an earlier lineage's
    // (after `tenant init --allow-reuse`), whose certificate then sits
    // at this path. Adopted only when it states this run's scope (its
    // audit record is this run's) and these keys' outcomes.
    let stored = &verified.certificate;
    if stored.scope != body.scope || stored.keys != body.keys {
        return Err(Error::corrupt(
            certificate_path(tenant, id).to_string(),
            format!(
                "the certificate stored there states another shred (scope of audit record {:?}, keys {}), \
                 not this one (scope of audit record {:?}, keys {}): refusing to report it as this \
                 shred's; the descriptor's certificate id was reused",
                stored.scope.audit_seq,
                key_list(&stored.keys),
                body.scope.audit_seq,
                key_list(&body.keys),
            ),
        ));
    }
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
    if let Some(bytes) = load_certificate(&ctx.store, tenant, id).await? {
        return adopt(ctx, tenant, id, &body, bytes);
    }
    let bytes = anchor_and_sign(ctx, journal, body.clone()).await?;
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
            adopt(ctx, tenant, id, &body, stored)
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
    let audit = audit_log(ctx)?;
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

/// What only the subject of a shred (the tenant, or one epoch) decides in
/// its certificate; [`certificate_body`] adds what every certificate shares.
pub(super) struct SubjectTerms {
    pub subject: Subject,
    pub epoch: Option<u32>,
    /// Kind, statement and pending note; its times come from `keys`.
    pub guarantee: Guarantee,
    /// The providers whose keys wrapped the shredded data keys.
    pub providers: Vec<String>,
    pub keys: Vec<KeyDestruction>,
    pub rewrap: Option<RewrapRecord>,
}

/// A certificate body from the descriptor's records and the subject's
/// terms: the fields every certificate carries are written here only.
pub(super) fn certificate_body(repo: &Repo, r: &Records<'_>, terms: SubjectTerms) -> Certificate {
    let d = repo.descriptor();
    let (state, p) = (r.state, r.progress);
    let providers: Vec<&str> = terms.providers.iter().map(String::as_str).collect();
    let mut guarantee = terms.guarantee;
    guarantee.irreversible_at = irreversible_at(&terms.keys);
    // Only where something was destroyed: a shred that destroyed no key
    // states no destruction times.
    guarantee.destruction_began_at = guarantee.irreversible_at.and(p.keys_began_at);
    Certificate {
        format: certificate::CERTIFICATE_FORMAT.into(),
        id: r.certificate_id.to_owned(),
        subject: terms.subject,
        tenant: d.tenant.clone(),
        epoch: terms.epoch,
        reason: state.reason.clone(),
        requested_by: state.requested_by.clone(),
        actor: p.actor.clone(),
        requested_at: p.requested_at,
        started_at: state.started_at,
        executed_at: p.executed_at.unwrap_or(state.started_at),
        issued_at: crate::hooks::now(),
        method: "cryptographic erase".into(),
        guarantee,
        algorithms: certificate::Algorithms::new(&providers),
        keys: terms.keys,
        scope: r.scope.clone().into(),
        deletion: r.deletion.clone(),
        rewrap: terms.rewrap,
        verification: r.verification.clone(),
        store: store_info(&repo.context().store_url),
        custos_version: env!("CARGO_PKG_VERSION").into(),
        audit: None,
    }
}

/// The keys a shred left untouched (ownership unproven), for the guarantee.
pub(super) fn not_destroyed(keys: &[KeyDestruction]) -> Option<String> {
    let spared: Vec<String> = keys
        .iter()
        .filter(|k| k.outcome == DestroyOutcome::NotDestroyed)
        .map(|k| k.reference.to_string())
        .collect();
    (!spared.is_empty()).then(|| spared.join(", "))
}

/// `guarantee.pending` of a certificate with keys left untouched.
pub(super) fn spared_note(keys: &[KeyDestruction], spared: &str) -> String {
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
pub(super) fn irreversible_at(keys: &[KeyDestruction]) -> Option<DateTime<Utc>> {
    keys.iter().filter_map(|k| k.irreversible_at).max()
}

/// What is pending while a scheduled key deletion can still be cancelled.
pub(super) fn pending_note(keys: &[KeyDestruction]) -> Option<String> {
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

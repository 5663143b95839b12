//! What a certificate states, checked against what the store cannot forge:
//! before one is signed, and before a stored one is reported as a finished
//! shred's. The descriptor's shred records are clear JSON in the store.

use chrono::{DateTime, Utc};

use crate::audit::AuditLog;
use crate::audit::record::AuditRecord;
use crate::error::{Error, Result};
use crate::format::shred::DestroyOutcome;
use crate::keys::{KeyError, KeyRef};
use crate::repo::Repo;
use crate::store::ObjectName;
use crate::tenant::TenantId;

use super::certificate::{self, Certificate};
use super::issue::audit_log;
use super::keys::{all_tenant_keys, state_shows_destruction};
use super::scope;
use super::{ShredReport, certificate_path, load_certificate};

/// Before a certificate is signed, what it states must hold now, whatever
/// the descriptor's shred records (scope, keys, deletion, verification)
/// say: they are clear JSON in the store, and a store writer can fence a
/// tenant with records of a shred that never ran, so that a re-run skips
/// every step and signs. Each statement is checked against what the store
/// cannot forge: the scope is this shred's record in this installation's
/// audit log (the `shred.scope.end` its `audit_seq` names: tenant,
/// certificate id, count, bytes, root), and [`what_holds_now`]. Any mismatch
/// refuses the certificate (nothing is signed).
pub(super) async fn confirm_before_signing(
    repo: &Repo,
    body: &Certificate,
    destroys_keys: bool,
    spared: Option<&KeyRef>,
) -> Result<()> {
    let ctx = repo.context();
    let tenant = repo.tenant();
    let mut problems = Vec::new();
    // The verification record comes from the descriptor, which the store
    // holds: one that says it failed is never signed, whatever the steps say.
    if !body.verification.passed {
        problems.push("its verification record says the verification failed".into());
    }
    match body.scope.audit_seq {
        None => problems.push(
            "its scope names no audit record (every scope step records one): it cannot be checked"
                .into(),
        ),
        Some(seq) => {
            let audit = audit_log(ctx)?;
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
    problems.extend(journal_problems(
        audit_log(ctx)?,
        tenant,
        body,
        crate::hooks::now(),
    )?);
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

/// Audit timestamps are written to the microsecond; a time custos took
/// just before appending a record may read as that much later.
const AUDIT_TIME_SLACK: chrono::Duration = chrono::Duration::milliseconds(1);

/// The times and the key list a certificate states, checked against what
/// custos itself recorded in its audit log (which the store cannot write)
/// for this shred (`certificate_id`, tenant and epoch): the key outcomes
/// are those of the last `shred.keys.end` record (none without one); when
/// destruction began is what the first `shred.keys.begin` record states
/// and no later than it; the shred began no later than its first record
/// (as its `shred.fence.begin` states, where it does); and the times run
/// in order, none in the future. Records up to a `shred.certificate.end`
/// of the same id belong to a shred already certified (an id reused by a
/// store writer), not to this one. Returns the problems found.
pub(super) fn journal_problems(
    audit: &AuditLog,
    tenant: &TenantId,
    body: &Certificate,
    now: DateTime<Utc>,
) -> Result<Vec<String>> {
    let mut records = Vec::new();
    for line in audit.read_lines(audit.size()?)? {
        let Ok(r) = AuditRecord::from_line(&line) else {
            continue;
        };
        let epoch = r.details.get("epoch").and_then(|e| e.as_u64());
        if r.tenant.as_ref() == Some(tenant)
            && r.event.starts_with("shred.")
            && r.details["certificate_id"] == body.id.as_str()
            && epoch == body.epoch.map(u64::from)
        {
            // A certificate issued under this id ends that shred: what came
            // before is another lineage's (an id a store writer reused).
            if r.event == "shred.certificate.end" {
                records.clear();
                continue;
            }
            records.push(r);
        }
    }
    let mut problems = Vec::new();
    let time_in = |r: &AuditRecord, field: &str| -> Option<DateTime<Utc>> {
        serde_json::from_value(r.details.get(field)?.clone()).ok()
    };
    let Some(first) = records.first() else {
        return Ok(vec![format!(
            "this installation's audit log has no record of shred {}: its times and keys cannot be checked",
            body.id
        )]);
    };
    if body.started_at > first.time + AUDIT_TIME_SLACK {
        problems.push(format!(
            "it states the shred began at {}, after its first audit record #{} ({})",
            body.started_at, first.seq, first.time
        ));
    }
    if let Some(fence) = records.iter().find(|r| r.event == "shred.fence.begin")
        && let Some(at) = time_in(fence, "started_at")
        && at != body.started_at
    {
        problems.push(format!(
            "it states the shred began at {}, but audit record #{} (shred.fence.begin) says {at}",
            body.started_at, fence.seq
        ));
    }
    let keys_begin = records.iter().find(|r| r.event == "shred.keys.begin");
    let keys_end = records.iter().rev().find(|r| r.event == "shred.keys.end");
    let recorded_keys = keys_end.map(|r| r.details.get("keys").cloned().unwrap_or_default());
    let stated_keys = serde_json::to_value(&body.keys).unwrap_or_default();
    match &recorded_keys {
        Some(keys) if keys != &stated_keys => problems.push(format!(
            "its keys are not those audit record #{} (the last shred.keys.end of this shred) lists",
            keys_end.map(|r| r.seq).unwrap_or_default()
        )),
        None if !body.keys.is_empty() => problems.push(
            "it lists keys, but the audit log records no key step of this shred (shred.keys.end)"
                .into(),
        ),
        _ => {}
    }
    if let Some(began) = body.guarantee.destruction_began_at {
        match keys_begin {
            None => problems.push(format!(
                "it states destruction began at {began}, but the audit log records no key step of this shred"
            )),
            Some(r) => {
                if let Some(at) = time_in(r, "keys_began_at")
                    && at != began
                {
                    problems.push(format!(
                        "it states destruction began at {began}, but audit record #{} (shred.keys.begin) says {at}",
                        r.seq
                    ));
                }
                if began > r.time + AUDIT_TIME_SLACK || began < body.started_at {
                    problems.push(format!(
                        "it states destruction began at {began}, outside the shred's own records (it began at {}, \
                         its first key step is audit record #{} at {})",
                        body.started_at, r.seq, r.time
                    ));
                }
            }
        }
    }
    if let Some(r) = keys_end
        && body.executed_at + AUDIT_TIME_SLACK < r.time
    {
        problems.push(format!(
            "it states the keys were ended at {}, before its key step ended (audit record #{} at {})",
            body.executed_at, r.seq, r.time
        ));
    }
    let order = [
        ("requested", Some(body.requested_at.min(body.started_at))),
        ("began", Some(body.started_at)),
        ("destruction began", body.guarantee.destruction_began_at),
        ("executed", Some(body.executed_at)),
    ];
    let mut last: Option<(&str, DateTime<Utc>)> = None;
    for (name, at) in order {
        let Some(at) = at else { continue };
        if let Some((before, t)) = last
            && at < t
        {
            problems.push(format!(
                "its times are out of order: {name} at {at}, before {before} at {t}"
            ));
        }
        if at > now + AUDIT_TIME_SLACK {
            problems.push(format!("it states {name} at {at}, in the future"));
        }
        last = Some((name, at));
    }
    Ok(problems)
}

/// What a certificate states that can be checked now, from what the store
/// cannot forge (a certificate about to be signed, or the stored one a
/// `shredded` descriptor points to): every key listed as destroyed or gone
/// shows it at its provider (`destroys_keys`: false for an epoch shred
/// without re-wrap, whose key lives on by design); with `complete`, no key
/// the tenant is known to own ([`all_tenant_keys`], `spared` aside: an epoch
/// shred's re-wrap target) is missing from the list; the store holds nothing
/// of the subject but the retained ciphertext. Returns the problems found.
pub(super) async fn what_holds_now(
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
            let described = match ctx.keys.key(&k.reference) {
                Ok(p) => p.describe().await,
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
pub(super) fn check_identity(
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

/// The report of a shred that finished before: the certificate the
/// descriptor names (`id`), reported only if it is this shred's (tenant,
/// id, `epoch`) and what it states still holds. The descriptor is
/// store-writable: else a store writer could pass off another tenant's (or
/// an earlier lineage's) certificate as proof that live data was shredded.
/// `subject` names it in messages (`tenant`, `epoch`), `destroys_keys` and
/// `complete` are as for [`what_holds_now`].
pub(super) async fn finished_report(
    repo: &Repo,
    id: &str,
    epoch: Option<u32>,
    subject: &str,
    destroys_keys: impl FnOnce(&Certificate) -> bool,
    complete: bool,
) -> Result<ShredReport> {
    let tenant = repo.tenant();
    let path = certificate_path(tenant, id).to_string();
    let bytes = load_certificate(&repo.context().store, tenant, id)
        .await?
        .ok_or_else(|| {
            Error::missing(
                &path,
                format!("the {subject} is shredded but its certificate is not in the store"),
            )
        })?;
    let doc =
        certificate::parse_unverified(&bytes).map_err(|e| Error::corrupt(&path, e.to_string()))?;
    check_identity(&doc.certificate, tenant, id, epoch)
        .map_err(|why| Error::corrupt(&path, why))?;
    let c = &doc.certificate;
    let problems = what_holds_now(repo, c, destroys_keys(c), complete, None).await?;
    if !problems.is_empty() {
        let it = match epoch {
            Some(e) => format!("epoch {e}"),
            None => "it".into(),
        };
        return Err(Error::ShredVerification {
            tenant: tenant.to_string(),
            message: format!(
                "its descriptor says {it} is shredded (certificate {id}), but {}: it is not shredded as that \
                 certificate states (the descriptor is not authenticated)",
                problems.join("; ")
            ),
        });
    }
    ShredReport::new(tenant, id, bytes, true, None)
}

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
/// certificate id, count, bytes, root), the request, times and keys are
/// those the shred's audit records state ([`journal_problems`]), and
/// [`what_holds_now`]. Any mismatch refuses the certificate (nothing is
/// signed). What the audit log does not record of the request (a shred
/// begun before custos recorded it) is stated as the descriptor has it,
/// and the certificate's reason says so ([`note_unvouched`]).
pub(super) async fn confirm_before_signing(
    repo: &Repo,
    body: &mut Certificate,
    destroys_keys: bool,
    spared: Option<&KeyRef>,
) -> Result<Option<String>> {
    let ctx = repo.context();
    let tenant = repo.tenant();
    let mut problems = Vec::new();
    // The verification record comes from the descriptor, which the store
    // holds: one that says it failed is never signed, whatever the steps say.
    if !body.verification.passed {
        problems.push("its verification record says the verification failed".into());
    }
    let shred = ShredRecords::read(
        audit_log(ctx)?,
        tenant,
        &body.id,
        body.epoch,
        body.scope.audit_seq,
    )?;
    let audited = journal_problems(&shred.records, body, crate::hooks::now());
    problems.extend(audited.problems);
    problems.extend(scope_problem(tenant, body, &shred));
    problems.extend(what_holds_now(repo, body, destroys_keys, destroys_keys, spared).await?);
    if problems.is_empty() {
        body.guarantee.destruction_began_at = audited.destruction_began_at;
        note_unvouched(body, &audited.unvouched);
        return Ok(shred.ended);
    }
    Err(Error::ShredVerification {
        tenant: tenant.to_string(),
        message: format!(
            "the shred records in the descriptor do not match what they claim: {} (no certificate issued: the \
             descriptor is not authenticated, and custos signs only what its own audit log vouches for; a shred \
             is certified only on the installation that began it, whose audit log holds its records: finish it \
             there, or find who edited tenants/{tenant}/tenant.json)",
            problems.join("; ")
        ),
    })
}

/// One shred's records in this installation's audit log, read in a single
/// streaming pass per certification (one line in memory at a time, and only
/// the lines that name the certificate id parsed).
pub(super) struct ShredRecords {
    /// This shred's records (`certificate_id`, tenant and epoch), in order.
    /// Those up to a `shred.certificate.end` of the same id are a shred a
    /// certificate ended: dropped once the tenant was initialised again
    /// after it (`tenant.init…`) or another shred's records of the id follow
    /// (another lineage's, an id a store writer reused); otherwise kept as
    /// [`ended`](Self::ended) (a run killed after its certificate was
    /// stored and recorded, before the descriptor said so).
    pub records: Vec<AuditRecord>,
    /// When `records` are those of a shred a certificate already ended: the
    /// SHA-256 of the certificate file its last `shred.certificate.end`
    /// records. Only that file may then be adopted; nothing is signed again
    /// (a store writer can delete it and rewrite the descriptor, but cannot
    /// make this log record another).
    pub ended: Option<String>,
    /// The record at the seq the scope names, whatever it is.
    pub scope: Option<AuditRecord>,
}

impl ShredRecords {
    pub(super) fn read(
        audit: &AuditLog,
        tenant: &TenantId,
        id: &str,
        epoch: Option<u32>,
        scope_seq: Option<u64>,
    ) -> Result<Self> {
        let mut out = ShredRecords {
            records: Vec::new(),
            scope: None,
            ended: None,
        };
        let needle = id.as_bytes();
        // The records a certificate of this id ended and its file's digest,
        // while nothing since says another lineage began.
        let mut ended: Option<(Vec<AuditRecord>, String)> = None;
        audit.scan_from(0, |seq, line| {
            if Some(seq) == scope_seq {
                out.scope = AuditRecord::from_line(line).ok();
            }
            if ended.is_some()
                && contains(line, b"tenant.init")
                && AuditRecord::from_line(line).is_ok_and(|r| {
                    r.tenant.as_ref() == Some(tenant) && r.event.starts_with("tenant.init")
                })
            {
                ended = None;
            }
            // The id is random: a line without it is no record of this shred.
            if needle.is_empty() || !contains(line, needle) {
                return true;
            }
            let Ok(r) = AuditRecord::from_line(line) else {
                return true;
            };
            let of_epoch = r.details.get("epoch").and_then(|e| e.as_u64());
            if r.tenant.as_ref() == Some(tenant)
                && r.event.starts_with("shred.")
                && r.details["certificate_id"] == id
                && of_epoch == epoch.map(u64::from)
            {
                let ending = r.event == "shred.certificate.end";
                let digest =
                    |r: &AuditRecord| r.details["file_sha256"].as_str().unwrap_or("").to_owned();
                // A resumed run of the ended shred (killed again after its
                // certificate) adds to that shred's records.
                let resumes_ended = ended.is_some()
                    && out.records.is_empty()
                    && (ending || r.event == RESUMED_EVENT);
                if resumes_ended {
                    if let Some((records, last)) = ended.as_mut() {
                        if ending {
                            *last = digest(&r);
                        } else {
                            records.push(r);
                        }
                    }
                } else if ending {
                    ended = Some((std::mem::take(&mut out.records), digest(&r)));
                } else {
                    ended = None;
                    out.records.push(r);
                }
            }
            true
        })?;
        if let Some((records, digest)) = ended {
            out.records = records;
            out.ended = Some(digest);
        }
        Ok(out)
    }
}

fn contains(line: &[u8], needle: &[u8]) -> bool {
    line.windows(needle.len()).any(|w| w == needle)
}

/// The scope a certificate states must be the `shred.scope.end` record its
/// `audit_seq` names, of this tenant and shred.
fn scope_problem(tenant: &TenantId, body: &Certificate, shred: &ShredRecords) -> Option<String> {
    let Some(seq) = body.scope.audit_seq else {
        return Some(
            "its scope names no audit record (every scope step records one): it cannot be checked"
                .into(),
        );
    };
    let record = shred.scope.as_ref();
    let matches = record.is_some_and(|r| {
        r.seq == seq
            && r.event == "shred.scope.end"
            && r.tenant.as_ref() == Some(tenant)
            && r.details["certificate_id"] == body.id.as_str()
            && r.details["merkle_root"] == body.scope.merkle_root.as_str()
            && r.details["objects"] == body.scope.objects
            && r.details["bytes"] == body.scope.bytes
            && r.details.get("epoch").and_then(|e| e.as_u64()) == body.epoch.map(u64::from)
    });
    (!matches).then(|| {
        format!(
            "its scope names audit record #{seq}, which is not the scope of this shred in this \
             installation's audit log ({})",
            match record {
                Some(r) => format!(
                    "#{seq} is {} of tenant {}",
                    r.event,
                    r.tenant.as_ref().map(|t| t.as_str()).unwrap_or("-")
                ),
                None => "no such record".into(),
            }
        )
    })
}

/// A shred that began here recorded its `shred.fence.begin` here: custos
/// writes one for every shred it fences, and for one the store fenced
/// without step records before it starts them. Without it the request is
/// the store's word alone; records of later steps alone are those of a run
/// that resumed here a shred begun elsewhere.
fn began_here(records: &[AuditRecord]) -> bool {
    records.iter().any(|r| r.event == "shred.fence.begin")
}

fn not_begun_here(id: &str) -> String {
    format!(
        "this installation's audit log has no record of how shred {id} began (its shred.fence.begin): it was \
         not begun here. A shred begun on another installation is certified only there, where its audit \
         records are: run `custos shred` again on that installation"
    )
}

/// A resumed shred with steps left runs them only where it began: run
/// elsewhere, their audit records (the scope's, the keys') would be in a
/// log the certificate is not checked against, on neither installation
/// whole, and no certificate could be issued for it anywhere. Refused
/// before anything is done. So is one this installation's audit log
/// records as certified: it has no step left, whatever the descriptor says.
pub(super) fn require_begun_here(repo: &Repo, id: &str, epoch: Option<u32>) -> Result<()> {
    let shred = ShredRecords::read(audit_log(repo.context())?, repo.tenant(), id, epoch, None)?;
    if let Some(digest) = &shred.ended {
        return Err(Error::ShredVerification {
            tenant: repo.tenant().to_string(),
            message: format!(
                "this installation's audit log records shred {id} as certified (shred.certificate.end, \
                 file SHA-256 {digest}), but the descriptor says steps are left: it was edited after the \
                 certificate (this run did nothing; find who edited tenants/{}/tenant.json)",
                repo.tenant()
            ),
        });
    }
    if began_here(&shred.records) {
        return Ok(());
    }
    Err(Error::ShredVerification {
        tenant: repo.tenant().to_string(),
        message: format!(
            "{} (this run did nothing: the tenant stays fenced; if the descriptor's shred records were not \
             written by custos, find who edited tenants/{}/tenant.json)",
            not_begun_here(id),
            repo.tenant()
        ),
    })
}

/// Audit timestamps are written to the microsecond; a time custos took
/// just before appending a record may read as that much later.
const AUDIT_TIME_SLACK: chrono::Duration = chrono::Duration::milliseconds(1);

/// The audit event a resumed run records the skip list it was given in.
pub(super) const RESUMED_EVENT: &str = "shred.resumed";

/// What [`journal_problems`] found.
#[derive(Debug, Default)]
pub(super) struct Audited {
    pub problems: Vec<String>,
    /// What the certificate states that the audit log does not record
    /// (a shred begun before custos recorded it): named in the certificate.
    pub unvouched: Vec<&'static str>,
    /// When destruction began, as the shred's first `shred.keys.begin`
    /// states it (where the certificate states a time at all).
    pub destruction_began_at: Option<DateTime<Utc>>,
}

/// What a certificate states of the request, the times and the key list,
/// checked against what custos itself recorded in its audit log (which the
/// store cannot write) for this shred ([`ShredRecords`]): the reason,
/// requester and request time are those its `shred.fence.begin` states; a
/// key left untouched is one the operator asked to leave (the skip list of
/// `shred.fence.begin` or of a resumed run's `shred.resumed`); the key
/// outcomes are those of the last `shred.keys.end` record (none without
/// one); when destruction began is what the first `shred.keys.begin` record
/// states and no later than it; the shred began no later than its first
/// record (as its `shred.fence.begin` states, where it does); and the times
/// run in order, none in the future.
pub(super) fn journal_problems(
    records: &[AuditRecord],
    body: &Certificate,
    now: DateTime<Utc>,
) -> Audited {
    let mut out = Audited::default();
    let Some(first) = records.first().filter(|_| began_here(records)) else {
        out.problems.push(format!(
            "{}, so its request, times and keys cannot be checked",
            not_begun_here(&body.id)
        ));
        return out;
    };
    let problems = &mut out.problems;
    if body.started_at > first.time + AUDIT_TIME_SLACK {
        problems.push(format!(
            "it states the shred began at {}, after its first audit record #{} ({})",
            body.started_at, first.seq, first.time
        ));
    }
    let fence = records.iter().find(|r| r.event == "shred.fence.begin");
    match fence.and_then(|f| Some((f.seq, time_in(f, "started_at")?))) {
        Some((seq, at)) if at != body.started_at => problems.push(format!(
            "it states the shred began at {}, but audit record #{seq} (shred.fence.begin) says {at}",
            body.started_at
        )),
        Some(_) => {}
        None => out.unvouched.push("start time"),
    }
    let requested_at = request_problems(fence, body, &mut out);
    skip_problems(records, fence, body, &mut out);
    let problems = &mut out.problems;
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
    // When destruction began is what the first key step recorded before
    // its first destroy call (or, in a record without that reading, the
    // record's own time), never the descriptor's copy, which the store holds.
    if let Some(stated) = body.guarantee.destruction_began_at {
        match keys_begin {
            None => problems.push(format!(
                "it states destruction began at {stated}, but the audit log records no key step of this shred"
            )),
            Some(r) => {
                let began = time_in(r, "keys_began_at").unwrap_or(r.time);
                if began > r.time + AUDIT_TIME_SLACK || began < body.started_at {
                    problems.push(format!(
                        "audit record #{} (shred.keys.begin) says destruction began at {began}, outside the \
                         shred's own records (it began at {}, the record is dated {})",
                        r.seq, body.started_at, r.time
                    ));
                }
                out.destruction_began_at = Some(began);
            }
        }
    }
    let problems = &mut out.problems;
    if let Some(r) = keys_end
        && body.executed_at + AUDIT_TIME_SLACK < r.time
    {
        problems.push(format!(
            "it states the keys were ended at {}, before its key step ended (audit record #{} at {})",
            body.executed_at, r.seq, r.time
        ));
    }
    // A request dated after the fence (a policy's date) orders as the fence.
    let order = [
        ("requested", Some(requested_at.min(body.started_at))),
        ("began", Some(body.started_at)),
        ("destruction began", out.destruction_began_at),
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
    out
}

fn time_in(r: &AuditRecord, field: &str) -> Option<DateTime<Utc>> {
    serde_json::from_value(r.details.get(field)?.clone()).ok()
}

/// The reason, requester and request time a certificate states, against
/// its `shred.fence.begin` record. Returns the request time to order by:
/// the recorded one, else (not recorded) the stated one, which `out`
/// then names as unvouched.
fn request_problems(
    fence: Option<&AuditRecord>,
    body: &Certificate,
    out: &mut Audited,
) -> DateTime<Utc> {
    let texts = [
        ("reason", "reason", &body.reason),
        ("requested_by", "requester", &body.requested_by),
    ];
    for (field, name, stated) in texts {
        match fence.and_then(|f| f.details.get(field)?.as_str().map(|v| (f.seq, v))) {
            Some((seq, recorded)) if recorded != stated.as_str() => out.problems.push(format!(
                "it states the {name} {stated:?}, but audit record #{seq} (shred.fence.begin) says {recorded:?}"
            )),
            Some(_) => {}
            None => out.unvouched.push(name),
        }
    }
    match fence.and_then(|f| Some((f.seq, time_in(f, "requested_at")?))) {
        Some((seq, recorded)) => {
            if recorded != body.requested_at {
                out.problems.push(format!(
                    "it states the shred was requested at {}, but audit record #{seq} (shred.fence.begin) says {recorded}",
                    body.requested_at
                ));
            }
            recorded
        }
        None => {
            out.unvouched.push("request time");
            body.requested_at
        }
    }
}

/// Every key a certificate lists as left untouched must be one the operator
/// asked to leave: in the skip list of the shred's `shred.fence.begin` or of
/// a resumed run's `shred.resumed`. A fence record without a skip list
/// (written before custos recorded it) cannot say: such keys are then
/// stated as the descriptor's list had them, and `out` names it.
fn skip_problems(
    records: &[AuditRecord],
    fence: Option<&AuditRecord>,
    body: &Certificate,
    out: &mut Audited,
) {
    let asked: Vec<KeyRef> = records
        .iter()
        .filter(|r| r.event == "shred.fence.begin" || r.event == RESUMED_EVENT)
        .filter_map(|r| {
            serde_json::from_value::<Vec<KeyRef>>(r.details.get("skip_unproven")?.clone()).ok()
        })
        .flatten()
        .collect();
    let recorded = fence.and_then(|f| f.details.get("skip_unproven").map(|_| f.seq));
    for k in body
        .keys
        .iter()
        .filter(|k| k.outcome == DestroyOutcome::NotDestroyed && !asked.contains(&k.reference))
    {
        match recorded {
            Some(seq) => out.problems.push(format!(
                "it lists key {} as left untouched on the operator's request (--skip-unproven-key), but no audit \
                 record of this shred records that request (skip lists of shred.fence.begin #{seq} and of any \
                 {RESUMED_EVENT}: [{}])",
                k.reference,
                asked.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
            )),
            None if !out.unvouched.contains(&"skip list") => out.unvouched.push("skip list"),
            None => {}
        }
    }
}

/// Names in the certificate's reason what it states as the descriptor has
/// it because the audit log does not record it for this shred (one begun
/// before custos recorded it): the certificate format is unchanged, and a
/// reader sees which statements nothing but the store vouches for.
fn note_unvouched(body: &mut Certificate, unvouched: &[&str]) {
    if unvouched.is_empty() {
        return;
    }
    body.reason = format!(
        "{} [{}: as the tenant descriptor states, not checked: this installation's audit log does not \
         record them for this shred (begun before custos recorded them, or fenced without its \
         shred.fence.begin record)]",
        body.reason,
        unvouched.join(", ")
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A tenant shred's certificate with one destroyed key.
    const FIXTURE: &[u8] =
        include_bytes!("../../../tests/it/data/certificates/v1-tenant-destruction-began-at.json");

    fn body() -> Certificate {
        certificate::parse_unverified(FIXTURE).unwrap().certificate
    }

    fn record(b: &Certificate, seq: u64, event: &str, at: DateTime<Utc>, d: Value) -> AuditRecord {
        let mut r = AuditRecord::new(seq, event, Some(&b.tenant), "cli:test", d, String::new());
        r.time = at;
        r
    }

    /// The records custos writes for the shred `b` states, with `fence` as
    /// its `shred.fence.begin` details.
    fn records(b: &Certificate, fence: Value) -> Vec<AuditRecord> {
        let began = b.guarantee.destruction_began_at.unwrap();
        vec![
            record(b, 1, "shred.fence.begin", b.started_at, fence),
            record(
                b,
                2,
                "shred.keys.begin",
                began,
                json!({ "keys_began_at": began }),
            ),
            record(
                b,
                3,
                "shred.keys.end",
                b.executed_at,
                json!({ "keys": b.keys }),
            ),
        ]
    }

    /// A fence record as custos writes it now.
    fn fence(b: &Certificate) -> Value {
        json!({
            "started_at": b.started_at,
            "reason": b.reason,
            "requested_by": b.requested_by,
            "requested_at": b.requested_at,
            "skip_unproven": [],
        })
    }

    fn check(b: &Certificate, records: &[AuditRecord]) -> Audited {
        journal_problems(records, b, b.issued_at)
    }

    #[test]
    fn a_certificate_matching_its_records_passes_with_nothing_unvouched() {
        let b = body();
        let a = check(&b, &records(&b, fence(&b)));
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert!(a.unvouched.is_empty(), "{:?}", a.unvouched);
    }

    #[test]
    fn a_request_the_descriptor_changed_is_refused_naming_both_values() {
        let b = body();
        let recs = records(&b, fence(&b));
        let mut forged = b.clone();
        forged.requested_at = b.requested_at - chrono::Duration::days(400);
        forged.reason = "court order".into();
        forged.requested_by = "someone else".into();
        let a = check(&forged, &recs);
        let all = a.problems.join("\n");
        assert_eq!(a.problems.len(), 3, "{all}");
        for part in [
            "requested at",
            &forged.requested_at.to_string(),
            &b.requested_at.to_string(),
            "reason \"court order\"",
            "says \"fixture\"",
            "requester \"someone else\"",
            "shred.fence.begin",
        ] {
            assert!(all.contains(part), "{part:?} not in {all}");
        }
    }

    /// A fence record written before custos recorded the request time and
    /// the skip list: the certificate states the descriptor's, and its
    /// reason says which statements nothing but the store vouches for.
    #[test]
    fn an_old_fence_record_falls_back_to_the_descriptor_and_says_so() {
        let mut b = body();
        let mut old = fence(&b);
        old.as_object_mut().unwrap().remove("requested_at");
        old.as_object_mut().unwrap().remove("skip_unproven");
        b.keys[0].outcome = DestroyOutcome::NotDestroyed;
        let a = check(&b, &records(&b, old));
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.unvouched, ["request time", "skip list"]);
        note_unvouched(&mut b, &a.unvouched);
        assert!(
            b.reason.starts_with(
                "fixture [request time, skip list: as the tenant descriptor states, not checked"
            ),
            "{}",
            b.reason
        );
    }

    /// A fence record without `started_at`: the start is the descriptor's,
    /// and said to be; with one, a back-dated start is refused.
    #[test]
    fn the_start_is_checked_against_the_fence_record() {
        let b = body();
        let mut old = fence(&b);
        old.as_object_mut().unwrap().remove("started_at");
        let a = check(&b, &records(&b, old));
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.unvouched, ["start time"]);
        let mut forged = b.clone();
        forged.started_at = b.started_at - chrono::Duration::hours(1);
        let a = check(&forged, &records(&b, fence(&b)));
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
        assert!(
            a.problems[0].contains("shred.fence.begin"),
            "{}",
            a.problems[0]
        );
    }

    /// A scope record alone (custos once started step records without a
    /// fence record) does not make the descriptor's request certifiable.
    #[test]
    fn step_records_without_a_fence_record_are_refused() {
        let b = body();
        let mut recs = records(&b, fence(&b));
        recs[0].event = "shred.scope.begin".into();
        let a = check(&b, &recs);
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
        assert!(
            a.problems[0].contains("not begun here"),
            "{}",
            a.problems[0]
        );
        assert!(a.unvouched.is_empty(), "{:?}", a.unvouched);
    }

    /// The start of destruction certified is the key step's record, not the
    /// certificate body's (the descriptor's copy).
    #[test]
    fn destruction_began_is_the_key_records_reading() {
        let b = body();
        let recs = records(&b, fence(&b));
        let mut forged = b.clone();
        let began = b.guarantee.destruction_began_at.unwrap();
        forged.guarantee.destruction_began_at = Some(b.started_at);
        let a = check(&forged, &recs);
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.destruction_began_at, Some(began));
    }

    #[test]
    fn a_key_left_untouched_must_be_one_the_operator_asked_to_leave() {
        let mut b = body();
        b.keys[0].outcome = DestroyOutcome::NotDestroyed;
        let key = b.keys[0].reference.clone();
        let mut recs = records(&b, fence(&b));
        let a = check(&b, &recs);
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
        assert!(
            a.problems[0].contains(&format!("key {key} as left untouched"))
                && a.problems[0].contains("--skip-unproven-key"),
            "{}",
            a.problems[0]
        );
        // Asked for by a resumed run.
        recs.push(record(
            &b,
            4,
            RESUMED_EVENT,
            b.executed_at,
            json!({ "skip_unproven": [key] }),
        ));
        let a = check(&b, &recs);
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert!(a.unvouched.is_empty(), "{:?}", a.unvouched);
    }

    #[test]
    fn no_record_of_how_the_shred_began_says_where_it_is_certified() {
        let b = body();
        // Only the records of steps a run resumed here wrote.
        let later: Vec<AuditRecord> = records(&b, fence(&b)).into_iter().skip(1).collect();
        for recs in [&[][..], &later[..]] {
            let a = check(&b, recs);
            assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
            assert!(
                a.problems[0].contains("not begun here")
                    && a.problems[0].contains("another installation"),
                "{}",
                a.problems[0]
            );
        }
    }

    #[test]
    fn no_record_of_the_shred_says_where_it_is_certified() {
        let b = body();
        let a = check(&b, &[]);
        assert_eq!(a.problems.len(), 1);
        assert!(
            a.problems[0].contains("not begun here")
                && a.problems[0].contains("another installation"),
            "{}",
            a.problems[0]
        );
    }
}

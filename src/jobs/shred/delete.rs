//! The `delete` step: deletes a subject's objects, in an order that makes
//! the data unreadable first, and lists what the store kept.

use crate::error::{Error, Result};
use crate::format::shred::{DeletionRecord, RetainedObject, ScopeRecord};
use crate::repo::Repo;
use crate::store::tenant::Listed;
use crate::store::{ObjectName, TenantStore};

use super::journal::Journal;

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
pub(super) async fn delete_in_scope(
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
        finished_at: crate::hooks::now(),
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

/// What the store may keep beyond its listing.
pub(super) fn store_note(url: &str) -> Option<String> {
    url.starts_with("s3://").then(|| {
        "S3: in a versioned bucket a delete only adds a delete marker, and earlier versions \
         (under Object Lock, until their retain-until date) remain; they are ciphertext under \
         the destroyed keys and are not listed here (the store API used does not list versions)"
            .to_owned()
    })
}

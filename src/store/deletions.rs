//! Deletion plans: `tenants/<t>/locks/deletions/<id>`, what a deleter
//! (prune, forget, epoch shred) is about to delete, written after it has
//! committed the state that no longer needs those objects and before it
//! lists the reader records.
//!
//! A reader registers first and reads the plans next; a deleter writes its
//! plan first and lists readers next. With the store's read-after-write and
//! list-after-write consistency, every reader is then either seen by the
//! deleter (which deletes nothing while it is live) or sees the plan (and
//! leaves the planned objects out of its view: it never reads them). See
//! `jobs::deletion` for the protocol and docs/FORMAT.md for the format.
//!
//! Plans are not authenticated: whoever writes the store could forge one.
//! They are therefore only ever used to *hide* objects from readers (which
//! that writer could achieve by deleting them) and never to decide what to
//! delete: deleters compute that from the repository itself.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{Dir, ObjectName, new_lock_id};
use super::tenant::TenantStore;
use crate::error::{Error, Result};
use crate::format::ids::{IdSet, IndexId, PackId, SnapshotId};

pub const PLAN_FORMAT: &str = "custos-deletion-plan/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionPlan {
    pub format: String,
    /// Holder (`host:pid:random`) and job of the deleter.
    pub holder: String,
    pub job: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<IndexId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<PackId>,
    /// Key epochs whose envelope goes (an epoch shred).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelopes: Vec<u32>,
}

impl DeletionPlan {
    pub fn new(holder: &str, job: &str) -> DeletionPlan {
        DeletionPlan {
            format: PLAN_FORMAT.into(),
            holder: holder.into(),
            job: job.into(),
            created_at: Utc::now(),
            snapshots: Vec::new(),
            index: Vec::new(),
            packs: Vec::new(),
            envelopes: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
            && self.index.is_empty()
            && self.packs.is_empty()
            && self.envelopes.is_empty()
    }

    /// How many objects it names.
    pub fn len(&self) -> usize {
        self.snapshots.len() + self.index.len() + self.packs.len() + self.envelopes.len()
    }

    /// The plan's objects as store names.
    pub fn objects(&self) -> Vec<ObjectName> {
        let mut v: Vec<ObjectName> = Vec::with_capacity(self.len());
        v.extend(self.snapshots.iter().map(|s| ObjectName::Snapshot(*s)));
        v.extend(self.index.iter().map(|i| ObjectName::Index(*i)));
        v.extend(self.packs.iter().map(|p| ObjectName::Pack(*p)));
        v.extend(self.envelopes.iter().map(|e| ObjectName::Envelope(*e)));
        v
    }
}

/// Writes a plan under a new id; returns the id.
pub async fn write(store: &TenantStore, plan: &DeletionPlan) -> Result<String> {
    let id = new_lock_id();
    let name = ObjectName::Deletion(id.clone());
    let body = Bytes::from(serde_json::to_vec(plan).expect("plans serialise"));
    // Retried (a deleter must not fail on one lost answer): the name is ours alone.
    store
        .create_unique(&name, body, |e| {
            Error::store("put", store.display(&name), e)
        })
        .await?;
    Ok(id)
}

/// Every plan in the store, with its id. Unreadable ones are left out (they
/// hide nothing; `custos check` does not rely on them).
pub async fn list(store: &TenantStore) -> Result<Vec<(String, DeletionPlan)>> {
    let mut out = Vec::new();
    for l in store.list(Dir::Deletions).await? {
        let Some(ObjectName::Deletion(id)) = l.name else {
            continue;
        };
        let Some((bytes, _)) = store
            .get_if_exists(&ObjectName::Deletion(id.clone()))
            .await?
        else {
            continue;
        };
        match serde_json::from_slice::<DeletionPlan>(&bytes) {
            Ok(p) if p.format == PLAN_FORMAT => out.push((id, p)),
            _ => tracing::warn!(
                event = "deletion_plan.unreadable",
                tenant = %store.tenant(),
                object = %store.display(&ObjectName::Deletion(id)),
                "an unreadable deletion plan is ignored"
            ),
        }
    }
    Ok(out)
}

pub async fn remove(store: &TenantStore, id: &str) -> Result<()> {
    store.delete(&ObjectName::Deletion(id.to_owned())).await
}

/// What pending deletions hide from a reader's view of the repository.
#[derive(Debug, Default, Clone)]
pub struct Hidden {
    pub snapshots: IdSet<SnapshotId>,
    pub index: IdSet<IndexId>,
    pub packs: IdSet<PackId>,
    pub envelopes: std::collections::BTreeSet<u32>,
    /// How many plans contributed.
    pub plans: usize,
}

impl Hidden {
    pub fn of(plans: &[(String, DeletionPlan)]) -> Hidden {
        let mut h = Hidden {
            plans: plans.len(),
            ..Default::default()
        };
        for (_, p) in plans {
            h.snapshots.extend(p.snapshots.iter().copied());
            h.index.extend(p.index.iter().copied());
            h.packs.extend(p.packs.iter().copied());
            h.envelopes.extend(p.envelopes.iter().copied());
        }
        h
    }

    pub async fn load(store: &TenantStore) -> Result<Hidden> {
        Ok(Hidden::of(&list(store).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;

    #[tokio::test]
    async fn plans_round_trip_and_hide_their_objects() {
        let s = TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap());
        assert_eq!(Hidden::load(&s).await.unwrap().plans, 0);
        let mut p = DeletionPlan::new("h:1:aa", "prune");
        p.packs.push(PackId::random());
        p.index.push(IndexId::random());
        p.snapshots.push(SnapshotId::random());
        assert_eq!(p.len(), 3);
        let id = write(&s, &p).await.unwrap();
        s.put(
            &ObjectName::Deletion(new_lock_id()),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        let listed = list(&s).await.unwrap();
        assert_eq!(listed, vec![(id.clone(), p.clone())]);
        let h = Hidden::of(&listed);
        assert!(h.packs.contains(&p.packs[0]) && h.index.contains(&p.index[0]));
        assert!(h.snapshots.contains(&p.snapshots[0]));
        remove(&s, &id).await.unwrap();
        assert!(list(&s).await.unwrap().is_empty());
    }
}

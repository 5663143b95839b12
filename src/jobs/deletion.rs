//! Deleters never delete under a reader.
//!
//! Every job that deletes packs, index files, snapshots or envelopes (prune,
//! forget, an epoch shred) holds the tenant lease and:
//!
//! 1. commits the state that no longer needs the objects (a consolidated
//!    index; for forget and an epoch shred the descriptor or local memory);
//! 2. **announces** them: writes a deletion plan naming them
//!    (`locks/deletions/<id>`);
//! 3. lists the reader records (`locks/readers/`), and waits, at most
//!    `[daemon] reader_wait`, until none of the readers listed then is live
//!    (released, provably dead, or expired; dead and expired records are
//!    removed, each with a `lease.takeover` event and audit record);
//! 4. deletes, then removes its plan (and any older plan whose objects are
//!    all gone).
//!
//! A reader registers its record before it reads anything and reads the
//! plans right after: it either registered before step 3's listing (and is
//! waited for) or it sees the plan (and leaves those objects out of its view,
//! see `Repo::reload`). That needs the store's read-after-write
//! and list-after-write consistency (S3 and the local store have both).
//!
//! When readers are still live at the end of the wait, prune and forget
//! **defer**: they delete nothing more, leave the plan (readers keep hiding
//! the objects, which are unreferenced) and report it; their next run
//! finishes. An epoch shred fails with `readers_active` (retryable) instead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::error::Result;
use crate::repo::Repo;
use crate::store::ObjectName;
use crate::store::deletions::{self, DeletionPlan};
use crate::store::layout::Dir;
use crate::store::lease::LeaseGuard;
use crate::store::readers::{self, ReaderState};

/// A published deletion plan and what the readers said.
#[derive(Debug)]
pub struct Announced {
    id: String,
    pub plan: DeletionPlan,
    pub readers: Readers,
}

/// Whether the objects may be deleted now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readers {
    /// No reader that could need them is left; `waited_for` were live at
    /// the listing and finished during the wait.
    Clear { waited_for: usize },
    /// Still reading at the end of the wait (`holder (job)` each).
    Busy {
        readers: Vec<String>,
        waited: Duration,
    },
}

/// What a deleter that deferred reports (prune, forget `deferred`).
#[derive(Debug, Clone, Serialize)]
pub struct Deferred {
    /// Objects planned and left for the next run.
    pub objects: usize,
    /// The readers still reading (`holder (job)`).
    pub readers: Vec<String>,
    pub waited_s: u64,
}

impl Announced {
    pub fn clear(&self) -> bool {
        matches!(self.readers, Readers::Clear { .. })
    }

    /// The report of a deferral, if it is one.
    pub fn deferred(&self) -> Option<Deferred> {
        match &self.readers {
            Readers::Clear { .. } => None,
            Readers::Busy { readers, waited } => Some(Deferred {
                objects: self.plan.len(),
                readers: readers.clone(),
                waited_s: waited.as_secs(),
            }),
        }
    }
}

/// Steps 2 and 3: publishes `plan` and waits for the readers that may not
/// have seen it. The caller holds the tenant lease.
pub async fn announce(repo: &Repo, lease: &LeaseGuard, plan: DeletionPlan) -> Result<Announced> {
    lease.ensure_held()?;
    let id = deletions::write(repo.store(), &plan).await?;
    let readers = wait_for_readers(repo, &plan.job).await?;
    if let Readers::Busy { readers, waited } = &readers {
        tracing::warn!(
            event = "deletion.deferred",
            tenant = %repo.tenant(),
            job = %plan.job,
            objects = plan.len(),
            readers = %readers.join(", "),
            waited_s = waited.as_secs(),
            "{} reader(s) still reading after {}s: their data is kept",
            readers.len(),
            waited.as_secs()
        );
    }
    Ok(Announced { id, plan, readers })
}

/// Before a key that wrapped the tenant's envelopes is destroyed (an epoch
/// shred's re-wrap, `rotate --replace-cmk --schedule-old-key-deletion`).
/// Every envelope is under the new key by then, but a reader that registered
/// before may have read one under the old key and not yet unwrapped it: the
/// key destroyed under it, it would fail as if the tenant's data were lost.
/// Waits for the readers live now (those that register later read only moved
/// envelopes), at most `reader_wait`; still reading then: `readers_active`
/// (retryable: the job resumes at this step, nothing destroyed).
pub async fn wait_before_destroying_keys(repo: &Repo, job: &str) -> Result<()> {
    match wait_for_readers(repo, job).await? {
        Readers::Clear { .. } => Ok(()),
        Readers::Busy { readers, waited } => Err(crate::error::Error::ReadersActive {
            tenant: repo.tenant().to_string(),
            readers: readers.join(", "),
            waited: humantime::format_duration(Duration::from_secs(waited.as_secs())).to_string(),
        }),
    }
}

/// Step 4's end: removes the plan (its objects are deleted), and any older
/// plan none of whose objects is left (a deferred or interrupted deleter's).
pub async fn finish(repo: &Repo, announced: Announced) -> Result<()> {
    deletions::remove(repo.store(), &announced.id).await?;
    let plans = deletions::list(repo.store()).await?;
    if plans.is_empty() {
        return Ok(());
    }
    let store = repo.store();
    let mut present = std::collections::HashSet::new();
    for dir in [Dir::Snapshots, Dir::Index, Dir::Packs, Dir::Keys] {
        present.extend(store.list(dir).await?.into_iter().filter_map(|l| l.name));
    }
    for (id, plan) in plans {
        if !plan.objects().iter().any(|o| present.contains(o)) {
            deletions::remove(store, &id).await?;
        }
    }
    Ok(())
}

/// Step 3. Lists the reader records; removes dead and expired ones; waits
/// until every reader live at the first listing is gone, for at most
/// `reader_wait`. Readers that register after the first listing are not
/// waited for: they read after the plan was written, and leave it alone.
pub async fn wait_for_readers(repo: &Repo, job: &str) -> Result<Readers> {
    let ctx = repo.context();
    let started = Instant::now();
    let deadline = started + ctx.reader_wait;
    let mut waiting: Option<BTreeMap<String, String>> = None;
    let mut waited_for = 0;
    let mut delay = Duration::from_millis(100);
    loop {
        let now = Utc::now();
        let mut live = BTreeMap::new();
        for entry in readers::list(repo.store()).await? {
            match entry.state(now) {
                ReaderState::Live => {
                    if waiting.as_ref().is_none_or(|w| w.contains_key(&entry.id)) {
                        live.insert(entry.id.clone(), entry.describe());
                    }
                }
                ReaderState::Dead(why) => {
                    remove_stale(repo, &entry, &format!("dead holder: {why}"), job).await
                }
                ReaderState::Expired => {
                    let expired = entry
                        .record
                        .as_ref()
                        .map(|r| r.expires_at.to_rfc3339())
                        .unwrap_or_default();
                    remove_stale(repo, &entry, &format!("expired at {expired}"), job).await
                }
                // Not a reader record of this format: it protects nothing
                // (`custos unlock` removes it).
                ReaderState::Unreadable => {}
            }
        }
        if waiting.is_none() {
            waited_for = live.len();
            if !live.is_empty() {
                tracing::info!(
                    event = "deletion.waiting",
                    tenant = %repo.tenant(),
                    job,
                    readers = %live.values().cloned().collect::<Vec<_>>().join(", "),
                    max_wait_s = ctx.reader_wait.as_secs(),
                    "waiting for {} reader(s) before deleting",
                    live.len()
                );
            }
        }
        if live.is_empty() {
            return Ok(Readers::Clear { waited_for });
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Readers::Busy {
                readers: live.into_values().collect(),
                waited: started.elapsed(),
            });
        }
        waiting = Some(live);
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Removes a dead or expired reader's record, recorded first in the audit
/// log (`lease.takeover`, `lock: reader`). If the record cannot be audited it
/// is left (it does not block the deleter either way).
async fn remove_stale(repo: &Repo, entry: &readers::ReaderEntry, reason: &str, job: &str) {
    let Some(record) = &entry.record else { return };
    tracing::warn!(
        event = "lease.takeover",
        tenant = %repo.tenant(),
        lock = "reader",
        previous_holder = %record.holder,
        previous_job = %record.job,
        previous_expiry = %record.expires_at.to_rfc3339(),
        reason,
        by = job,
        "a reader record of a gone reader is removed ({reason})"
    );
    let details = serde_json::json!({
        "lock": "reader",
        "record": repo.store().display(&ObjectName::Reader(entry.id.clone())),
        "previous_holder": record.holder,
        "previous_job": record.job,
        "expired_at": record.expires_at,
        "reason": reason,
        "by": job,
    });
    if let Err(e) = repo
        .context()
        .record("lease.takeover", Some(repo.tenant()), details)
        .await
    {
        tracing::error!(event = "audit.failed", tenant = %repo.tenant(), error = %e, "could not record the removal of a reader record; left in place");
        return;
    }
    if let Err(e) = readers::remove(repo.store(), &entry.id).await {
        tracing::warn!(tenant = %repo.tenant(), error = %e, "could not remove a stale reader record");
    }
}

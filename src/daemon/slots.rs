//! Slot marks: `tenants/<t>/locks/schedule-<job>`, the last scheduled slot of
//! a job that ran, written by whichever daemon ran it.
//!
//! Several daemons sharing a store all plan every slot. The tenant lease makes
//! sure only one runs a tenant's job at a time; the mark makes sure a slot
//! runs once: the daemon holding the lease reads the mark first and declines
//! a slot that is already recorded, and records its slot (with the outcome)
//! before it lets the lease go. Both happen under the lease, so no second
//! daemon can slip in between. A failed run counts as the slot's run: the
//! next slot tries again, and the failure is reported (event, report, metric).
//!
//! Readers (check, drill) take no lease, so they claim their slot instead:
//! a mark with outcome `running`, written with a conditional put (created,
//! or updated from the version read), before the job runs; the final mark
//! replaces the claim, again conditionally. Of two daemons, one claim wins;
//! the other declines the slot. A reader killed mid-run leaves its claim: the
//! slot counts as run (not as a success), and the next slot runs.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::plan::Subset;
use crate::error::{Error, Result};
use crate::report::JobKind;
use crate::store::layout::ScheduleName;
use crate::store::{ObjectName, TenantStore};

/// The object of a job's mark, named after the job.
fn mark_name(job: JobKind) -> Result<ObjectName> {
    ScheduleName::new(job.as_str())
        .map(ObjectName::Schedule)
        .ok_or_else(|| Error::Internal(format!("job {job} has no slot mark name")))
}

/// How the recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkOutcome {
    Success,
    Failure,
    /// A reader's claim, replaced by its outcome when it ends.
    Running,
}

/// The content of a slot mark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotMark {
    pub job: JobKind,
    /// The schedule slot the run belonged to.
    pub slot: DateTime<Utc>,
    /// Lease holder (host:pid:random) of the daemon that ran it.
    pub holder: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: MarkOutcome,
    /// For `check`: the `--read-data` slice it read, so the next check (by
    /// any daemon) reads the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data: Option<Subset>,
}

impl SlotMark {
    /// True when this mark covers `slot` (it is that slot or a later one).
    pub fn covers(&self, slot: DateTime<Utc>) -> bool {
        self.slot >= slot
    }
}

/// Reads a job's mark. An unreadable mark (not JSON, another version) is
/// treated as absent, with a warning: it can only cause a slot to run again,
/// never to be skipped.
pub async fn read(store: &TenantStore, job: JobKind) -> Result<Option<SlotMark>> {
    let name = mark_name(job)?;
    let Some((bytes, _)) = store.get_if_exists(&name).await? else {
        return Ok(None);
    };
    match serde_json::from_slice::<SlotMark>(&bytes) {
        Ok(m) if m.job == job => Ok(Some(m)),
        Ok(_) | Err(_) => {
            tracing::warn!(
                event = "schedule.mark_unreadable",
                tenant = %store.tenant(),
                job = %job,
                object = %store.display(&name),
                "unreadable slot mark ignored"
            );
            Ok(None)
        }
    }
}

/// Reads a job's mark and the version of the object (for a conditional
/// claim); an unreadable mark reads as absent, with its version.
pub async fn read_versioned(
    store: &TenantStore,
    job: JobKind,
) -> Result<(Option<SlotMark>, Option<UpdateVersion>)> {
    let name = mark_name(job)?;
    let Some((bytes, meta)) = store.get_if_exists(&name).await? else {
        return Ok((None, None));
    };
    let version = UpdateVersion {
        e_tag: meta.e_tag,
        version: meta.version,
    };
    let mark = serde_json::from_slice::<SlotMark>(&bytes)
        .ok()
        .filter(|m| m.job == job);
    if mark.is_none() {
        tracing::warn!(
            event = "schedule.mark_unreadable",
            tenant = %store.tenant(),
            job = %job,
            object = %store.display(&name),
            "unreadable slot mark ignored"
        );
    }
    Ok((mark, Some(version)))
}

/// Writes a job's mark only if the object is still as read (`seen`: the
/// version read, `None`: there was none). Returns the new version, or `None`
/// if another daemon wrote it first.
pub async fn write_conditional(
    store: &TenantStore,
    mark: &SlotMark,
    seen: Option<UpdateVersion>,
) -> Result<Option<UpdateVersion>> {
    let name = mark_name(mark.job)?;
    let body = Bytes::from(encode(mark)?);
    let mode = match seen {
        Some(v) => PutMode::Update(v),
        None => PutMode::Create,
    };
    match store.put_conditional(&name, body, mode).await {
        Ok(r) => Ok(Some(UpdateVersion {
            e_tag: r.e_tag,
            version: r.version,
        })),
        Err(
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotFound { .. },
        ) => Ok(None),
        Err(e) => Err(Error::store("put", store.display(&name), e)),
    }
}

/// Writes a job's mark. Callers hold the tenant lease.
pub async fn write(store: &TenantStore, mark: &SlotMark) -> Result<()> {
    let body = encode(mark)?;
    store.put(&mark_name(mark.job)?, Bytes::from(body)).await?;
    Ok(())
}

fn encode(mark: &SlotMark) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(mark).map_err(|e| Error::Internal(format!("slot mark: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;

    #[test]
    fn every_job_has_its_own_mark() {
        let mut paths = std::collections::BTreeSet::new();
        for job in JobKind::ALL {
            let path = mark_name(job).unwrap().relative().to_string();
            assert_eq!(path, format!("locks/schedule-{job}"));
            assert!(paths.insert(path));
        }
    }

    #[tokio::test]
    async fn marks_round_trip_and_garbage_reads_as_absent() {
        let store = TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap());
        assert_eq!(read(&store, JobKind::Check).await.unwrap(), None);
        let now = Utc::now();
        let mark = SlotMark {
            job: JobKind::Check,
            slot: now,
            holder: "h".into(),
            started_at: now,
            finished_at: now,
            outcome: MarkOutcome::Success,
            read_data: Some(Subset { n: 2, of: 10 }),
        };
        write(&store, &mark).await.unwrap();
        assert_eq!(
            read(&store, JobKind::Check).await.unwrap(),
            Some(mark.clone())
        );
        assert!(mark.covers(now) && !mark.covers(now + chrono::Duration::seconds(1)));
        assert_eq!(read(&store, JobKind::Backup).await.unwrap(), None);
        store
            .put(
                &mark_name(JobKind::Backup).unwrap(),
                Bytes::from_static(b"{"),
            )
            .await
            .unwrap();
        assert_eq!(read(&store, JobKind::Backup).await.unwrap(), None);
    }

    /// Two daemons claiming one reader slot: one wins, the other declines.
    #[tokio::test]
    async fn a_reader_slot_is_claimed_once() {
        let store = TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap());
        let now = Utc::now();
        let claim = |holder: &str| SlotMark {
            job: JobKind::Drill,
            slot: now,
            holder: holder.into(),
            started_at: now,
            finished_at: now,
            outcome: MarkOutcome::Running,
            read_data: None,
        };
        let (none, v0) = read_versioned(&store, JobKind::Drill).await.unwrap();
        assert!(none.is_none() && v0.is_none());
        let a = write_conditional(&store, &claim("a"), None).await.unwrap();
        assert!(a.is_some());
        assert!(
            write_conditional(&store, &claim("b"), None)
                .await
                .unwrap()
                .is_none()
        );
        let (mark, v1) = read_versioned(&store, JobKind::Drill).await.unwrap();
        assert_eq!(mark.unwrap().holder, "a");
        // a records its outcome over its claim; a stale version loses.
        let done = SlotMark {
            outcome: MarkOutcome::Success,
            ..claim("a")
        };
        assert!(write_conditional(&store, &done, a).await.unwrap().is_some());
        assert!(
            write_conditional(&store, &claim("b"), v1)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(read(&store, JobKind::Drill).await.unwrap(), Some(done));
    }
}

//! Reader records: `tenants/<t>/locks/readers/<id>`, one per running reader
//! (restore, drill, check, snapshots). Readers take no lease and never wait;
//! instead each registers a record **before it reads any repository state**,
//! renews it like a lease, and removes it at the end. Deleters (prune,
//! forget, epoch shred) publish what they are about to delete first
//! ([`super::deletions`]), then list these records, and delete nothing while
//! a reader listed then is still live (see `jobs::deletion`).
//!
//! Every id is random and written only by its reader (created with a
//! conditional put, renewed with conditional updates), so removing a record
//! can never remove somebody else's: a dead reader's record may simply be
//! deleted. A record that lapses (its renewal came after its expiry, or it
//! was removed) marks the reader lost: a deleter may have ignored it, so the
//! reader's result is not trusted ([`ReaderGuard::check`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::holder::{self, Liveness, ProcessIdentity};
use super::keepalive::{Keepalive, Renew};
use super::layout::{Dir, ObjectName, new_lock_id};
use super::tenant::TenantStore;
use crate::error::{Error, Result};
use crate::tenant::TenantId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderRecord {
    /// The reader's holder name (`host:pid:random`, as in leases).
    pub holder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessIdentity>,
    /// The job reading: `restore`, `drill`, `check`, `snapshots`.
    pub job: String,
    pub started_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl ReaderRecord {
    pub fn liveness(&self) -> Liveness {
        holder::judge(self.process.as_ref(), Some(self.renewed_at))
    }
}

/// One listed reader record.
#[derive(Debug, Clone)]
pub struct ReaderEntry {
    pub id: String,
    /// `None`: the object does not parse as a reader record (no reader of
    /// this version wrote it; it protects nothing).
    pub record: Option<ReaderRecord>,
}

/// What a listed record means for a deleter and for `custos unlock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderState {
    /// Within its TTL and not provably dead: it may be reading.
    Live,
    /// Past its expiry without renewal: its reader stopped or stalled, and
    /// will fail with `reader_lost` should it wake up.
    Expired,
    /// Its process is provably gone (see [`holder::judge`]).
    Dead(String),
    /// Not a reader record.
    Unreadable,
}

impl ReaderEntry {
    pub fn state(&self, now: DateTime<Utc>) -> ReaderState {
        let Some(r) = &self.record else {
            return ReaderState::Unreadable;
        };
        if r.expires_at <= now {
            return ReaderState::Expired;
        }
        match r.liveness() {
            Liveness::Dead(why) => ReaderState::Dead(why),
            Liveness::Alive | Liveness::Unknown => ReaderState::Live,
        }
    }

    /// `holder (job)`, for messages.
    pub fn describe(&self) -> String {
        match &self.record {
            Some(r) => format!("{} ({})", r.holder, r.job),
            None => format!("unreadable reader record {}", self.id),
        }
    }
}

/// Every reader record of the tenant.
pub async fn list(store: &TenantStore) -> Result<Vec<ReaderEntry>> {
    let mut out = Vec::new();
    for l in store.list(Dir::Readers).await? {
        let Some(ObjectName::Reader(id)) = l.name else {
            continue;
        };
        // Gone between the listing and the read: it was released.
        let Some((bytes, _)) = store.get_if_exists(&ObjectName::Reader(id.clone())).await? else {
            continue;
        };
        out.push(ReaderEntry {
            id,
            record: serde_json::from_slice(&bytes).ok(),
        });
    }
    Ok(out)
}

/// Removes a reader record (a dead, expired or, with `unlock --force`, any
/// reader's). Its id was written by that reader alone, so this cannot remove
/// another reader's record; should its reader still run, its next renewal
/// fails and it reports `reader_lost`.
pub async fn remove(store: &TenantStore, id: &str) -> Result<()> {
    store.delete(&ObjectName::Reader(id.to_owned())).await
}

/// A registered reader. Renewed in the background every third of its TTL.
pub struct ReaderGuard {
    inner: Arc<Inner>,
    keepalive: Keepalive,
}

struct Inner {
    store: TenantStore,
    ttl: Duration,
    name: ObjectName,
    job: String,
    state: Mutex<(ReaderRecord, UpdateVersion)>,
    /// The expiry of the record as last written (read without waiting for
    /// a renewal in flight).
    expires: std::sync::Mutex<DateTime<Utc>>,
    /// Why the record lapsed, once it has.
    lost: std::sync::Mutex<Option<String>>,
}

const ATTEMPTS: u32 = 4;

/// The TTL of reader records: the lease TTL, but at least a minute. A reader
/// whose renewal comes late must fail (`reader_lost`), so a short TTL on a
/// loaded host would fail readers for nothing; a long one costs only a
/// deleter's wait for a reader that died on another host (this host's dead
/// readers are recognised at once), and that wait is bounded by `reader_wait`.
pub fn ttl(lease_ttl: Duration) -> Duration {
    lease_ttl.max(Duration::from_secs(60))
}

fn chrono_ttl(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

fn version(meta_e_tag: Option<String>, meta_version: Option<String>) -> UpdateVersion {
    UpdateVersion {
        e_tag: meta_e_tag,
        version: meta_version,
    }
}

impl ReaderGuard {
    /// Registers a reader of `job`. Fails if the record cannot be written
    /// (a read-only store: readers need to write this one object).
    pub async fn register(
        store: &TenantStore,
        holder: &str,
        job: &str,
        ttl: Duration,
    ) -> Result<ReaderGuard> {
        Self::register_as(store, holder, holder::current().cloned(), job, ttl).await
    }

    /// [`ReaderGuard::register`] with an explicit process identity (tests).
    pub async fn register_as(
        store: &TenantStore,
        holder: &str,
        process: Option<ProcessIdentity>,
        job: &str,
        ttl: Duration,
    ) -> Result<ReaderGuard> {
        let name = ObjectName::Reader(new_lock_id());
        let now = Utc::now();
        let record = ReaderRecord {
            holder: holder.to_owned(),
            process,
            job: job.to_owned(),
            started_at: now,
            renewed_at: now,
            expires_at: now + chrono_ttl(ttl),
        };
        let body = Bytes::from(serde_json::to_vec(&record).expect("reader record serialises"));
        let (e_tag, ver) = store
            .create_unique(&name, body, |e| register_error(store, &name, e))
            .await?;
        Ok(Self::start(store, ttl, name, record, version(e_tag, ver)))
    }

    fn start(
        store: &TenantStore,
        ttl: Duration,
        name: ObjectName,
        record: ReaderRecord,
        v: UpdateVersion,
    ) -> ReaderGuard {
        let inner = Arc::new(Inner {
            store: store.clone(),
            ttl,
            name,
            job: record.job.clone(),
            expires: std::sync::Mutex::new(record.expires_at),
            state: Mutex::new((record, v)),
            lost: std::sync::Mutex::new(None),
        });
        let keepalive = Keepalive::spawn(&inner, ttl);
        ReaderGuard { inner, keepalive }
    }

    pub fn id(&self) -> &str {
        match &self.inner.name {
            ObjectName::Reader(id) => id,
            _ => unreachable!("a reader record"),
        }
    }

    pub fn tenant(&self) -> &TenantId {
        self.inner.store.tenant()
    }

    pub fn job(&self) -> &str {
        &self.inner.job
    }

    /// Fails with `reader_lost` if the record lapsed at any moment: a renewal
    /// came too late or found it removed, or it is past its expiry now. A
    /// deleter may then have deleted what this reader was reading, so its
    /// result must not be trusted (the runner turns it into this error).
    pub fn check(&self) -> Result<()> {
        let lost = self.inner.lost.lock().expect("not poisoned").clone();
        let expires = *self.inner.expires.lock().expect("not poisoned");
        let reason = match lost {
            Some(why) => Some(why),
            None if expires <= Utc::now() => Some(format!(
                "the record expired at {} without renewal",
                expires.to_rfc3339()
            )),
            None => None,
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(Error::ReaderLost {
                tenant: self.tenant().to_string(),
                reason,
            }),
        }
    }

    /// [`ReaderGuard::check`], and then the record read back from the store:
    /// it must still be the one this reader last wrote. The keepalive looks
    /// only every third of the TTL, so a record removed or rewritten since
    /// (`custos unlock --force`, a deleter whose clock ran ahead and judged it
    /// expired, a store writer) would go unnoticed by a reader that ends
    /// before its next renewal, and it would report as corruption what the
    /// deleter then removed. Readers call this at their end, before their
    /// result is trusted; a record that cannot be read back is not confirmed.
    pub async fn confirm(&self) -> Result<()> {
        self.check()?;
        let lost = |reason: String| {
            Err(Error::ReaderLost {
                tenant: self.tenant().to_string(),
                reason,
            })
        };
        {
            // Waits for a renewal in flight: the record is then the one it wrote.
            let state = self.inner.state.lock().await;
            match self.inner.store.get_if_exists(&self.inner.name).await {
                Ok(Some((bytes, _)))
                    if serde_json::from_slice::<ReaderRecord>(&bytes).ok().as_ref()
                        == Some(&state.0) => {}
                Ok(Some(_)) => {
                    return lost(
                        "the record was rewritten by another process while reading".into(),
                    );
                }
                Ok(None) => {
                    return lost(
                        "the record was removed while reading (custos unlock --force, or a deleter found it stale)"
                            .into(),
                    );
                }
                Err(e) => return lost(format!("the record could not be read back: {e}")),
            }
        }
        // A renewal that failed while we looked.
        self.check()
    }

    /// Stops renewing (after a renewal in flight) and removes the record.
    pub async fn release(mut self) {
        self.keepalive.stop(self.inner.ttl).await;
        if let Err(e) = self.inner.store.delete(&self.inner.name).await {
            // It expires on its own; until then deleters wait for it.
            tracing::warn!(event = "reader.release_failed", tenant = %self.tenant(), error = %e, "could not remove the reader record");
        }
    }
}

impl Renew for Inner {
    async fn renew_record(&self) -> std::result::Result<(), String> {
        self.renew().await
    }

    fn lost(&self, why: String) {
        tracing::error!(event = "reader.lost", tenant = %self.store.tenant(), error = %why, "the reader record lapsed");
        // Even past a panic elsewhere: a lapse must never go unreported.
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        *lost = Some(why);
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        // Not released (panic, cancellation): stop renewing; it expires.
        self.keepalive.abort();
    }
}

impl Inner {
    /// Renews the record. Returns why it lapsed: expired before this renewal
    /// (a deleter may have ignored it), removed, or unreachable.
    async fn renew(&self) -> std::result::Result<(), String> {
        let mut state = self.state.lock().await;
        let now = Utc::now();
        if state.0.expires_at <= now {
            return Err(format!(
                "the record expired at {} before it could be renewed",
                state.0.expires_at.to_rfc3339()
            ));
        }
        let mut record = state.0.clone();
        record.renewed_at = now;
        record.expires_at = now + chrono_ttl(self.ttl);
        let body = Bytes::from(serde_json::to_vec(&record).expect("serialises"));
        let mut uncertain = false;
        let mut delay = (self.ttl / 30).max(Duration::from_millis(20));
        for attempt in 1..=ATTEMPTS {
            match self
                .store
                .put_conditional(&self.name, body.clone(), PutMode::Update(state.1.clone()))
                .await
            {
                Ok(r) => {
                    *self.expires.lock().expect("not poisoned") = record.expires_at;
                    *state = (record, version(r.e_tag, r.version));
                    return Ok(());
                }
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::NotFound { .. }) => {
                    // Our own earlier attempt, its answer lost?
                    if uncertain
                        && let Ok(Some((bytes, meta))) = self.store.get_if_exists(&self.name).await
                        && serde_json::from_slice::<ReaderRecord>(&bytes).ok().as_ref()
                            == Some(&record)
                    {
                        *self.expires.lock().expect("not poisoned") = record.expires_at;
                        *state = (record, version(meta.e_tag, meta.version));
                        return Ok(());
                    }
                    return Err(
                        "the record was removed (custos unlock, or a deleter found it stale)"
                            .into(),
                    );
                }
                Err(e) if attempt < ATTEMPTS && super::tenant::is_transient(&e) => {
                    uncertain = true;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(format!("renewal failed: {e}")),
            }
        }
        unreachable!("the last attempt returns")
    }
}

fn register_error(store: &TenantStore, name: &ObjectName, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. } => {
            Error::ConditionalWritesUnsupported {
                url: store.display(name),
                message: format!("reader records need conditional writes: {e}"),
            }
        }
        // A store this process cannot write: readers need this one object.
        e => Error::store(
            "register reader (readers write one record before reading)",
            store.display(name),
            e,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tstore() -> TenantStore {
        TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap())
    }

    #[tokio::test]
    async fn a_reader_registers_renews_and_removes_its_record() {
        let s = tstore();
        let r = ReaderGuard::register(&s, "h:1:aa", "restore", Duration::from_millis(300))
            .await
            .unwrap();
        let listed = list(&s).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, r.id());
        assert_eq!(listed[0].state(Utc::now()), ReaderState::Live);
        assert_eq!(listed[0].describe(), "h:1:aa (restore)");
        // Renewed past its first expiry.
        tokio::time::sleep(Duration::from_millis(500)).await;
        r.check().unwrap();
        assert_eq!(
            list(&s).await.unwrap()[0].state(Utc::now()),
            ReaderState::Live
        );
        r.release().await;
        assert!(list(&s).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_removed_record_makes_its_reader_lost() {
        let s = tstore();
        let r = ReaderGuard::register(&s, "h:1:aa", "check", Duration::from_millis(150))
            .await
            .unwrap();
        remove(&s, r.id()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = r.check().unwrap_err();
        assert_eq!(err.kind(), "reader_lost");
        assert!(err.is_transient(), "retryable");
        // The renewal did not bring it back.
        assert!(list(&s).await.unwrap().is_empty());
        r.release().await;
    }

    /// Removed between two renewals: `check` cannot know yet, `confirm`
    /// reads the record back and does.
    #[tokio::test]
    async fn a_record_removed_before_the_next_renewal_is_noticed_by_confirm() {
        let s = tstore();
        let r = ReaderGuard::register(&s, "h:1:aa", "check", Duration::from_secs(3600))
            .await
            .unwrap();
        r.confirm().await.unwrap();
        remove(&s, r.id()).await.unwrap();
        r.check().unwrap();
        let err = r.confirm().await.unwrap_err();
        assert_eq!(err.kind(), "reader_lost");
        assert!(err.to_string().contains("removed while reading"), "{err}");
        r.release().await;
    }

    #[tokio::test]
    async fn a_record_past_its_expiry_is_expired_and_its_reader_lost() {
        let s = tstore();
        let r = ReaderGuard::register(&s, "h:1:aa", "drill", Duration::from_millis(90))
            .await
            .unwrap();
        // The reader stalls: no renewal runs (the keepalive is stopped).
        r.keepalive.abort();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            list(&s).await.unwrap()[0].state(Utc::now()),
            ReaderState::Expired
        );
        assert_eq!(r.check().unwrap_err().kind(), "reader_lost");
        r.release().await;
    }

    #[tokio::test]
    async fn garbage_and_dead_records_are_told_apart() {
        let s = tstore();
        s.put(
            &ObjectName::Reader(new_lock_id()),
            Bytes::from_static(b"not json"),
        )
        .await
        .unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let me = holder::current().unwrap().clone();
        let dead = ReaderGuard::register_as(
            &s,
            "dead",
            Some(ProcessIdentity { pid, ..me }),
            "restore",
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        let mut states: Vec<ReaderState> = list(&s)
            .await
            .unwrap()
            .iter()
            .map(|e| e.state(Utc::now()))
            .collect();
        states.sort_by_key(|s| format!("{s:?}"));
        assert!(
            matches!(&states[0], ReaderState::Dead(w) if w.contains("no longer exists")),
            "{states:?}"
        );
        assert_eq!(states[1], ReaderState::Unreadable);
        dead.release().await;
    }
}

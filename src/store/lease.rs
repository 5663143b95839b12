//! Tenant leases: at most one job per tenant at a time, across processes and
//! machines sharing a store. A lease is `tenants/<t>/locks/lease`, created with
//! a conditional put, renewed with a conditional update while the job runs,
//! and taken over only once released (marked so by its holder, left in place)
//! or expired (a crashed holder's lease runs out). Every write is conditional.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{PutMode, PutResult, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::layout::ObjectName;
use super::tenant::TenantStore;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub job: String,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set by the holder when its job ends. The record is left in place, not
    /// deleted: the next holder takes it over with a conditional update, so
    /// no step of a lease's life is unconditional (object stores offer no
    /// conditional delete, and a delete could remove a newer holder's lease).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl LeaseRecord {
    /// Whether `other` is this same lease (one holder's one acquisition),
    /// whatever its expiry.
    fn same_lease(&self, other: &LeaseRecord) -> bool {
        (&self.holder, &self.job, self.acquired_at)
            == (&other.holder, &other.job, other.acquired_at)
    }
}

/// A held lease. Renewed in the background every third of its TTL; if a
/// renewal finds the lease taken, [`LeaseGuard::ensure_held`] fails from then on,
/// so the job stops before it commits anything.
pub struct LeaseGuard {
    inner: Arc<Inner>,
    keepalive: tokio::task::JoinHandle<()>,
    /// Tells the keepalive task to stop once any renewal in flight is done.
    stop: Arc<tokio::sync::Notify>,
    /// The expired lease this one replaced, if any.
    took_over_from: Option<LeaseRecord>,
}

struct Inner {
    store: TenantStore,
    ttl: Duration,
    state: Mutex<(LeaseRecord, UpdateVersion)>,
    lost: AtomicBool,
}

/// A process-unique holder name: host, pid and a random suffix.
pub fn holder_id() -> String {
    let host = hostname();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        hex::encode(crate::util::random_bytes::<4>())
    )
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn version(r: &PutResult) -> UpdateVersion {
    UpdateVersion {
        e_tag: r.e_tag.clone(),
        version: r.version.clone(),
    }
}

fn chrono_ttl(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

impl LeaseGuard {
    /// Takes the tenant's lease for `job`, or fails with `LeaseContended`
    /// naming the current holder.
    pub async fn acquire(
        store: &TenantStore,
        holder: &str,
        job: &str,
        ttl: Duration,
    ) -> Result<LeaseGuard> {
        let name = ObjectName::Lease;
        for _ in 0..5 {
            let now = Utc::now();
            let record = LeaseRecord {
                holder: holder.to_owned(),
                job: job.to_owned(),
                acquired_at: now,
                expires_at: now + chrono_ttl(ttl),
                released: false,
            };
            let body = Bytes::from(serde_json::to_vec(&record).expect("lease serialises"));
            match store
                .put_conditional(&name, body.clone(), PutMode::Create)
                .await
            {
                Ok(r) => return Ok(Self::start(store, ttl, record, version(&r), None)),
                Err(object_store::Error::AlreadyExists { .. }) => {}
                // A transient failure: the lease may or may not have been written.
                // Look (below): if it is ours, it is taken over as our own.
                Err(e) if super::tenant::is_transient(&e) => {
                    tracing::debug!(error = %e, "transient error taking the lease; retrying");
                    tokio::time::sleep(Duration::from_millis(100 + rand::random_range(0..200)))
                        .await;
                }
                Err(e) => return Err(Self::conditional_error(store, e)),
            }
            // Someone holds it, or held it and died: look.
            let Some((bytes, meta)) = store.get_if_exists(&name).await? else {
                continue;
            };
            let current: Option<LeaseRecord> = serde_json::from_slice(&bytes).ok();
            let released = current.as_ref().is_some_and(|c| c.released);
            if let Some(cur) = &current
                && !released
                && cur.expires_at > now
                && cur.holder != holder
            {
                return Err(Error::LeaseContended {
                    tenant: store.tenant().to_string(),
                    holder: format!("{} ({})", cur.holder, cur.job),
                    expires: cur.expires_at.to_rfc3339(),
                });
            }
            let seen = UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            };
            match store
                .put_conditional(&name, body, PutMode::Update(seen))
                .await
            {
                Ok(r) => {
                    if released {
                        return Ok(Self::start(store, ttl, record, version(&r), None));
                    }
                    tracing::warn!(
                        event = "lease.takeover",
                        tenant = %store.tenant(),
                        previous_holder = current.as_ref().map(|c| c.holder.as_str()).unwrap_or("unreadable lease"),
                        previous_expiry = current.as_ref().map(|c| c.expires_at.to_rfc3339()).unwrap_or_default(),
                        "took over an expired lease"
                    );
                    return Ok(Self::start(store, ttl, record, version(&r), current));
                }
                // Another process took it first, or it was released: try again.
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) if super::tenant::is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(100 + rand::random_range(0..200)))
                        .await;
                    continue;
                }
                Err(e) => return Err(Self::conditional_error(store, e)),
            }
        }
        Err(Error::LeaseContended {
            tenant: store.tenant().to_string(),
            holder: "another process (the lease changed hands repeatedly)".into(),
            expires: "unknown".into(),
        })
    }

    fn conditional_error(store: &TenantStore, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotImplemented { .. }
            | object_store::Error::NotSupported { .. } => Error::ConditionalWritesUnsupported {
                url: store.display(&ObjectName::Lease),
                message: format!("leases need conditional writes: {e}"),
            },
            e => Error::store("lease", store.display(&ObjectName::Lease), e),
        }
    }

    fn start(
        store: &TenantStore,
        ttl: Duration,
        record: LeaseRecord,
        v: UpdateVersion,
        took_over_from: Option<LeaseRecord>,
    ) -> LeaseGuard {
        let inner = Arc::new(Inner {
            store: store.clone(),
            ttl,
            state: Mutex::new((record, v)),
            lost: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let keepalive = tokio::spawn(async move {
            loop {
                // A renewal is never cut short: cancelled mid-request, its
                // write could still land after the release read the version.
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = stopped.notified() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.renew().await {
                    tracing::error!(event = "lease.lost", tenant = %inner.store.tenant(), error = %e, "lease renewal failed");
                    inner.lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
        LeaseGuard {
            inner,
            keepalive,
            stop,
            took_over_from,
        }
    }

    /// The expired lease this acquisition replaced (a crashed holder), if any.
    pub fn took_over_from(&self) -> Option<&LeaseRecord> {
        self.took_over_from.as_ref()
    }

    /// Fails if the lease could not be renewed (taken over, store unreachable
    /// past the TTL). Jobs call this before committing a snapshot or deleting.
    pub fn ensure_held(&self) -> Result<()> {
        if self.inner.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseContended {
                tenant: self.inner.store.tenant().to_string(),
                holder: "another process (this job's lease was lost)".into(),
                expires: "unknown".into(),
            });
        }
        Ok(())
    }

    pub async fn record(&self) -> LeaseRecord {
        self.inner.state.lock().await.0.clone()
    }

    /// Releases the lease if it is still ours: lets a renewal in flight
    /// finish (for up to a TTL), then marks the lease released with a
    /// conditional update of our own version. Transient store errors are
    /// retried: a lease left held blocks the tenant until it expires.
    pub async fn release(mut self) {
        self.stop.notify_one();
        if tokio::time::timeout(self.inner.ttl, &mut self.keepalive)
            .await
            .is_err()
        {
            // A renewal stuck in retries: cut it short. Should its write still
            // land, the conflict below finds our own lease and retries.
            self.keepalive.abort();
        }
        let mut state = self.inner.state.lock().await;
        if self.inner.lost.load(Ordering::SeqCst) {
            return;
        }
        let mut released = state.0.clone();
        released.released = true;
        released.expires_at = Utc::now();
        let body = Bytes::from(serde_json::to_vec(&released).expect("serialises"));
        let name = ObjectName::Lease;
        let tenant = self.inner.store.tenant().to_string();
        let give_up = |e: &dyn std::fmt::Display| {
            tracing::warn!(event = "lease.release_failed", tenant = %tenant, error = %e, "could not release the lease; it expires on its own");
        };
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=RENEW_ATTEMPTS {
            match self
                .inner
                .store
                .put_conditional(&name, body.clone(), PutMode::Update(state.1.clone()))
                .await
            {
                Ok(_) => return,
                // The version moved: an earlier attempt of ours landed with its
                // response lost, a renewal landed late, or the lease is no
                // longer ours. Look.
                Err(object_store::Error::Precondition { .. }) => {
                    match self.inner.store.get_if_exists(&name).await {
                        Ok(Some((bytes, meta))) => {
                            match serde_json::from_slice::<LeaseRecord>(&bytes) {
                                Ok(cur) if cur == released => return,
                                // Still ours under a version we did not see:
                                // release that one.
                                Ok(cur) if cur.same_lease(&released) && !cur.released => {
                                    state.1 = UpdateVersion {
                                        e_tag: meta.e_tag,
                                        version: meta.version,
                                    };
                                    continue;
                                }
                                _ => {
                                    tracing::info!(event = "lease.released_elsewhere", tenant = %tenant, "the lease was no longer ours to release");
                                    return;
                                }
                            }
                        }
                        Ok(None) => return,
                        Err(e) => return give_up(&e),
                    }
                }
                Err(e) if attempt < RENEW_ATTEMPTS && super::tenant::is_transient(&e) => {
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => return give_up(&e),
            }
        }
        give_up(&"the lease kept changing under us");
    }
}

/// Renewal (and release) attempts before giving up. Renewals run every third
/// of the TTL, so a few quick retries fit well inside it.
const RENEW_ATTEMPTS: u32 = 4;

impl Inner {
    /// Renews the lease. Transient store errors are retried; a renewal whose
    /// response was lost but which was written shows up as a changed version
    /// holding our own record, and is adopted rather than taken for a takeover.
    async fn renew(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let mut record = state.0.clone();
        record.expires_at = Utc::now() + chrono_ttl(self.ttl);
        let body = Bytes::from(serde_json::to_vec(&record).expect("serialises"));
        let name = ObjectName::Lease;
        let fail = |e| Error::store("renew lease", self.store.display(&name), e);
        let mut uncertain = false;
        let mut delay = (self.ttl / 30).max(Duration::from_millis(20));
        for attempt in 1..=RENEW_ATTEMPTS {
            match self
                .store
                .put_conditional(&name, body.clone(), PutMode::Update(state.1.clone()))
                .await
            {
                Ok(r) => {
                    *state = (record, version(&r));
                    return Ok(());
                }
                Err(object_store::Error::Precondition { .. }) if uncertain => {
                    // Did our earlier attempt land? Then the lease holds our record.
                    if let Some((bytes, meta)) = self.store.get_if_exists(&name).await?
                        && serde_json::from_slice::<LeaseRecord>(&bytes).ok().as_ref()
                            == Some(&record)
                    {
                        let v = UpdateVersion {
                            e_tag: meta.e_tag,
                            version: meta.version,
                        };
                        *state = (record, v);
                        return Ok(());
                    }
                    return Err(fail(object_store::Error::Precondition {
                        path: name.to_string(),
                        source: "the lease was taken over".into(),
                    }));
                }
                Err(e) if attempt < RENEW_ATTEMPTS && super::tenant::is_transient(&e) => {
                    tracing::debug!(error = %e, attempt, "transient error renewing the lease; retrying");
                    uncertain = true;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(fail(e)),
            }
        }
        unreachable!("the last attempt returns")
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Not released explicitly (panic, cancellation): stop renewing and let
        // the lease expire, rather than block in drop.
        self.keepalive.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;

    fn tstore() -> TenantStore {
        TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap())
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_expiry_allows_takeover() {
        let s = tstore();
        let a = take(&s, "a").await;
        let err = LeaseGuard::acquire(&s, "b", "prune", Duration::from_secs(60))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), "lease_contended");
        assert!(err.to_string().contains("a (backup)"), "{err}");
        a.release().await;
        let b = LeaseGuard::acquire(&s, "b", "prune", Duration::from_millis(200))
            .await
            .unwrap();
        // b "crashes": no renewal, the lease runs out, c takes over.
        b.keepalive.abort();
        std::mem::forget(b);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = LeaseGuard::acquire(&s, "c", "backup", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(c.record().await.holder, "c");
        c.ensure_held().unwrap();
    }

    /// A store whose lease writes answer late (half the latency after the
    /// write), so a release often meets a renewal in flight: the release must
    /// wait for it rather than cut it short and then conflict with its write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_during_a_renewal_still_releases() {
        use crate::store::faults::{FaultConfig, FaultyStore, Op};
        let slow = FaultyStore::new(
            crate::store::memory(),
            FaultConfig {
                latency: 1.0,
                latency_max: Duration::from_millis(120),
                ops: vec![Op::Put],
                paths: Some("locks/lease".into()),
                ..Default::default()
            },
        );
        let s = TenantStore::new(Arc::new(slow), &TenantId::new("acme").unwrap());
        let ttl = Duration::from_millis(150); // a renewal every 50 ms
        for round in 0..12u64 {
            let a = LeaseGuard::acquire(&s, "a", "backup", ttl).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60 + 7 * round)).await;
            a.release().await;
            assert!(
                stored(&s)
                    .await
                    .is_some_and(|r| r.released && r.holder == "a"),
                "round {round}: the lease was not released"
            );
            // Another holder gets it at once, without waiting for an expiry.
            let b = LeaseGuard::acquire(&s, "b", "prune", Duration::from_secs(60))
                .await
                .unwrap();
            assert!(b.took_over_from().is_none(), "round {round}");
            b.release().await;
        }
    }

    /// `holder`'s lease with a TTL longer than any test.
    async fn take(s: &TenantStore, holder: &str) -> LeaseGuard {
        LeaseGuard::acquire(s, holder, "backup", Duration::from_secs(60))
            .await
            .unwrap()
    }

    async fn stored(s: &TenantStore) -> Option<LeaseRecord> {
        let (bytes, _) = s.get_if_exists(&ObjectName::Lease).await.unwrap()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    async fn put_record(s: &TenantStore, r: &LeaseRecord) {
        s.put(
            &ObjectName::Lease,
            Bytes::from(serde_json::to_vec(r).unwrap()),
        )
        .await
        .unwrap();
    }

    /// A released lease is free at once, whatever its expiry, and taking it
    /// is no crash of its holder.
    #[tokio::test]
    async fn a_released_lease_is_taken_at_once_without_a_crash_report() {
        let s = tstore();
        let a = take(&s, "a").await;
        a.release().await;
        let b = take(&s, "b").await;
        assert!(b.took_over_from().is_none(), "a release is not a crash");
        assert_eq!(stored(&s).await.unwrap().holder, "b");
        assert!(!stored(&s).await.unwrap().released);
        b.ensure_held().unwrap();
    }

    /// Our own lease under a version we did not see (a renewal's write that
    /// landed after we stopped looking) is still released.
    #[tokio::test]
    async fn release_adopts_a_version_of_its_own_lease_it_did_not_see() {
        let s = tstore();
        let a = take(&s, "a").await;
        let mut renewed = a.record().await;
        renewed.expires_at += chrono::Duration::seconds(20);
        put_record(&s, &renewed).await; // a new version, behind a's back
        a.release().await;
        let r = stored(&s).await.unwrap();
        assert!(r.released && r.holder == "a", "{r:?}");
    }

    /// A lease taken over behind our back is left to its new holder.
    #[tokio::test]
    async fn release_leaves_another_holders_lease_alone() {
        let s = tstore();
        let a = take(&s, "a").await;
        let mut other = a.record().await;
        other.holder = "b".into();
        put_record(&s, &other).await;
        a.release().await;
        assert_eq!(stored(&s).await.unwrap(), other);
    }

    #[tokio::test]
    async fn a_lease_taken_over_is_noticed_by_its_old_holder() {
        let s = tstore();
        let a = LeaseGuard::acquire(&s, "a", "backup", Duration::from_millis(300))
            .await
            .unwrap();
        // Simulate a takeover behind a's back.
        s.put(&ObjectName::Lease, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(a.ensure_held().unwrap_err().kind(), "lease_contended");
    }
}

//! Tenant leases: at most one job per tenant at a time, across processes and
//! machines sharing a store. A lease is `tenants/<t>/locks/lease`, created with
//! a conditional put, renewed with a conditional update while the job runs,
//! and taken over only once expired (a crashed holder's lease runs out).

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
    /// Set by a holder releasing the lease, just before it deletes it. Until
    /// `expires_at` (a short grace) others wait for the delete rather than
    /// take the record over: a takeover in between would be deleted with it.
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

/// How long a released lease is left for its holder to delete before others
/// may take it over (the delete failed, or the holder died in between).
const RELEASE_GRACE: Duration = Duration::from_secs(5);

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
        let mut attempts = 0;
        while attempts < 5 {
            attempts += 1;
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
            if let Some(cur) = &current
                && cur.released
                && cur.expires_at > now
                && cur.expires_at <= now + chrono_ttl(RELEASE_GRACE)
            {
                // Its holder is deleting it: wait for that (not an attempt;
                // bounded by the grace), then create.
                attempts -= 1;
                tokio::time::sleep(Duration::from_millis(50 + rand::random_range(0..100))).await;
                continue;
            }
            if let Some(cur) = &current
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
                    // A released lease whose delete never came is no crash.
                    if current.as_ref().is_some_and(|c| c.released) {
                        tracing::debug!(tenant = %store.tenant(), "took over a released lease its holder did not delete");
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

    /// Releases the lease if it is still ours: waits for a renewal in
    /// flight, marks the lease released (a conditional update of our own
    /// version), then deletes it. Transient store errors are retried: a lease
    /// left behind blocks the tenant until it expires.
    pub async fn release(mut self) {
        self.stop.notify_one();
        let _ = (&mut self.keepalive).await;
        let mut state = self.inner.state.lock().await;
        if self.inner.lost.load(Ordering::SeqCst) {
            return;
        }
        let mut released = state.0.clone();
        released.released = true;
        released.expires_at = Utc::now() + chrono_ttl(RELEASE_GRACE.min(self.inner.ttl));
        let body = Bytes::from(serde_json::to_vec(&released).expect("serialises"));
        let name = ObjectName::Lease;
        let tenant = self.inner.store.tenant().to_string();
        let mut done = false;
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=RENEW_ATTEMPTS {
            match self
                .inner
                .store
                .put_conditional(&name, body.clone(), PutMode::Update(state.1.clone()))
                .await
            {
                Ok(_) => {
                    done = true;
                    break;
                }
                // The version moved: an earlier attempt of ours landed with its
                // response lost, or the lease is no longer ours. Look.
                Err(object_store::Error::Precondition { .. }) => {
                    match self.inner.store.get_if_exists(&name).await {
                        Ok(Some((bytes, meta))) => {
                            match serde_json::from_slice::<LeaseRecord>(&bytes) {
                                Ok(cur) if cur == released => done = true,
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
                                    tracing::info!(event = "lease.released_elsewhere", tenant = %tenant, "the lease was no longer ours to release")
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(event = "lease.release_failed", tenant = %tenant, error = %e, "could not release the lease; it expires on its own");
                        }
                    }
                    break;
                }
                Err(e) if attempt < RENEW_ATTEMPTS && super::tenant::is_transient(&e) => {
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => {
                    tracing::warn!(event = "lease.release_failed", tenant = %tenant, error = %e, "could not release the lease; it expires on its own");
                    break;
                }
            }
        }
        if done {
            // Marked released: if this delete fails, the next job takes the
            // record over once its grace has passed.
            let _ = self.inner.store.delete(&name).await;
        }
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
        let a = LeaseGuard::acquire(&s, "a", "backup", Duration::from_secs(60))
            .await
            .unwrap();
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
                s.get_if_exists(&ObjectName::Lease).await.unwrap().is_none(),
                "round {round}: the lease was left behind"
            );
            // Another holder gets it at once, without waiting for an expiry.
            let b = LeaseGuard::acquire(&s, "b", "prune", Duration::from_secs(60))
                .await
                .unwrap();
            assert!(b.took_over_from().is_none(), "round {round}");
            b.release().await;
        }
    }

    /// Between marking the lease released and deleting it, another holder
    /// waits rather than takes the record over (the delete would remove its
    /// lease); if the delete never comes, the record is taken after the grace.
    #[tokio::test]
    async fn a_released_lease_is_waited_for_then_taken_without_a_crash_report() {
        let s = tstore();
        let a = LeaseGuard::acquire(&s, "a", "backup", Duration::from_millis(600))
            .await
            .unwrap();
        let mut record = a.record().await;
        // a dies without releasing, just after marking the lease released.
        a.keepalive.abort();
        std::mem::forget(a);
        record.released = true;
        record.expires_at = Utc::now() + chrono::Duration::milliseconds(300);
        s.put(
            &ObjectName::Lease,
            Bytes::from(serde_json::to_vec(&record).unwrap()),
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let b = LeaseGuard::acquire(&s, "b", "prune", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(b.took_over_from().is_none(), "a release is not a crash");
        assert_eq!(b.record().await.holder, "b");
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

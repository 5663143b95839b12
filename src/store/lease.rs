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
}

/// A held lease. Renewed in the background every third of its TTL; if a
/// renewal finds the lease taken, [`LeaseGuard::ensure_held`] fails from then on,
/// so the job stops before it commits anything.
pub struct LeaseGuard {
    inner: Arc<Inner>,
    keepalive: tokio::task::JoinHandle<()>,
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
                    tracing::warn!(
                        event = "lease.takeover",
                        tenant = %store.tenant(),
                        previous_holder = current.as_ref().map(|c| c.holder.as_str()).unwrap_or("unreadable lease"),
                        previous_expiry = current.as_ref().map(|c| c.expires_at.to_rfc3339()).unwrap_or_default(),
                        "took over an expired lease"
                    );
                    return Ok(Self::start(
                        store,
                        ttl,
                        record,
                        version(&r),
                        current.clone(),
                    ));
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
        let keepalive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
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

    /// Releases the lease if it is still ours. Transient store errors are
    /// retried: a lease left behind blocks the tenant until it expires.
    pub async fn release(self) {
        self.keepalive.abort();
        let state = self.inner.state.lock().await;
        if self.inner.lost.load(Ordering::SeqCst) {
            return;
        }
        // Only delete our own version: a conditional update to an expired
        // record first, so a takeover in between is not deleted by mistake.
        let mut expired = state.0.clone();
        expired.expires_at = Utc::now() - chrono::Duration::seconds(1);
        let body = Bytes::from(serde_json::to_vec(&expired).expect("serialises"));
        let name = ObjectName::Lease;
        let mut released = false;
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=RENEW_ATTEMPTS {
            match self
                .inner
                .store
                .put_conditional(&name, body.clone(), PutMode::Update(state.1.clone()))
                .await
            {
                Ok(_) => {
                    released = true;
                    break;
                }
                // An earlier attempt may have landed with its response lost.
                Err(object_store::Error::Precondition { .. }) if attempt > 1 => {
                    released = matches!(
                        self.inner.store.get_if_exists(&name).await,
                        Ok(Some((bytes, _)))
                            if serde_json::from_slice::<LeaseRecord>(&bytes).ok().as_ref() == Some(&expired)
                    );
                    break;
                }
                Err(e) if attempt < RENEW_ATTEMPTS && super::tenant::is_transient(&e) => {
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => {
                    tracing::warn!(event = "lease.release_failed", tenant = %self.inner.store.tenant(), error = %e, "could not release the lease; it expires on its own");
                    break;
                }
            }
        }
        if released {
            // Expired already: if this delete fails, the next job takes it over.
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

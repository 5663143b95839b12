//! Tenant leases: at most one writer (backup, rotate, forget, prune, shred)
//! per tenant at a time, across processes and machines sharing a store. A
//! lease is `tenants/<t>/locks/lease`, created with a conditional put, renewed
//! with a conditional update while the job runs, and taken over only once
//! released (marked so by its holder, left in place), expired (a crashed
//! holder's lease runs out), or held by a provably dead process of this host
//! ([`super::holder`]: taken over at once). Every write is conditional.
//!
//! Readers (restore, check, drill) take no lease: they register a reader
//! record ([`super::readers`]) and get a shared [`LeaseGuard`] that cannot
//! commit anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::{PutMode, PutResult, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::holder::{self, Liveness, ProcessIdentity};
use super::keepalive::{Keepalive, Renew};
use super::layout::ObjectName;
use super::readers::ReaderGuard;
use super::tenant::TenantStore;
use crate::error::{Error, Result};

pub use super::holder::{holder_id, hostname};

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
    /// The holder's process, so that its death on this host can be proved
    /// (absent in records of earlier versions: those expire by TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessIdentity>,
    /// When the holder last wrote the record (by its clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<DateTime<Utc>>,
}

impl LeaseRecord {
    /// Whether `other` is this same lease (one holder's one acquisition),
    /// whatever its expiry.
    fn same_lease(&self, other: &LeaseRecord) -> bool {
        (&self.holder, &self.job, self.acquired_at)
            == (&other.holder, &other.job, other.acquired_at)
    }

    /// Whether the holder is provably dead (see [`holder::judge`]).
    pub fn liveness(&self) -> Liveness {
        holder::judge(
            self.process.as_ref(),
            Some(self.renewed_at.unwrap_or(self.acquired_at)),
        )
    }
}

/// What a job holds on its tenant: the exclusive lease (writers), or a
/// shared reader record (readers). Writers call [`LeaseGuard::ensure_held`]
/// before every commit or deletion; it fails for a shared guard, so a job
/// that writes can never run on a reader's guard.
pub struct LeaseGuard {
    access: Access,
}

enum Access {
    Exclusive(Box<Exclusive>),
    Shared(ReaderGuard),
}

/// A held lease. Renewed in the background every third of its TTL; if a
/// renewal finds the lease taken, [`LeaseGuard::ensure_held`] fails from then on,
/// so the job stops before it commits anything.
struct Exclusive {
    inner: Arc<Inner>,
    keepalive: Keepalive,
    /// The lease this one replaced (expired, or held by a dead process), and why.
    took_over_from: Option<(LeaseRecord, String)>,
}

/// Whether a writer's lease is still held ([`LeaseGuard::check`]).
#[derive(Clone)]
pub struct LeaseCheck(Arc<Inner>);

impl LeaseCheck {
    /// Fails as [`LeaseGuard::ensure_held`] does once the lease was lost.
    pub fn ensure_held(&self) -> Result<()> {
        self.0.ensure_held()
    }
}

struct Inner {
    store: TenantStore,
    ttl: Duration,
    state: Mutex<(LeaseRecord, UpdateVersion)>,
    lost: AtomicBool,
    /// When the lease last written runs out, by the boot clock (its write
    /// began before this instant less the TTL): past it, another process may
    /// take it over even while a renewal still hangs.
    valid_until: std::sync::Mutex<BootTime>,
    /// Set when the release begins: what still runs on the job's behalf (an
    /// upload task) must not commit once another process may hold the lease.
    released: AtomicBool,
}

/// A point on `CLOCK_BOOTTIME`. `Instant` (`CLOCK_MONOTONIC`) stops while
/// the host is suspended, but the TTL other hosts read in the lease runs on:
/// a job resumed after a suspend longer than the TTL must see its lease as
/// run out, not as still held for the time left before the suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BootTime(Duration);

impl BootTime {
    fn now() -> BootTime {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let clock = rustix::time::ClockId::Boottime;
        // Elsewhere (not a supported server platform) the monotonic clock.
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let clock = rustix::time::ClockId::Monotonic;
        let t = rustix::time::clock_gettime(clock);
        // Both fields are non-negative for this clock (time since boot).
        BootTime(Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        ))
    }
}

impl std::ops::Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_add(d))
    }
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
        Exclusive::acquire(store, holder, holder::current().cloned(), job, ttl)
            .await
            .map(|e| LeaseGuard {
                access: Access::Exclusive(Box::new(e)),
            })
    }

    /// A reader's guard: no lease, the reader record `reader` instead.
    pub fn shared(reader: ReaderGuard) -> LeaseGuard {
        LeaseGuard {
            access: Access::Shared(reader),
        }
    }

    /// True for a writer's lease, false for a reader's record.
    pub fn is_exclusive(&self) -> bool {
        matches!(self.access, Access::Exclusive(_))
    }

    /// The reader record behind a shared guard.
    pub fn reader(&self) -> Option<&ReaderGuard> {
        match &self.access {
            Access::Shared(r) => Some(r),
            Access::Exclusive(_) => None,
        }
    }

    /// The lease this acquisition replaced (a crashed holder's), if any.
    pub fn took_over_from(&self) -> Option<&LeaseRecord> {
        match &self.access {
            Access::Exclusive(e) => e.took_over_from.as_ref().map(|(r, _)| r),
            Access::Shared(_) => None,
        }
    }

    /// Why the replaced lease was free: expired, or the dead holder's evidence.
    pub fn takeover_reason(&self) -> Option<&str> {
        match &self.access {
            Access::Exclusive(e) => e.took_over_from.as_ref().map(|(_, why)| why.as_str()),
            Access::Shared(_) => None,
        }
    }

    /// Fails if the lease could not be renewed (taken over, store unreachable
    /// past the TTL). Jobs call this before committing a snapshot or deleting.
    /// A reader's guard always fails: readers never commit.
    pub fn ensure_held(&self) -> Result<()> {
        match &self.access {
            Access::Exclusive(e) => e.inner.ensure_held(),
            Access::Shared(r) => Err(Error::Internal(format!(
                "a {} job of tenant {} holds a reader record, not the tenant lease: it cannot change the repository",
                r.job(),
                r.tenant()
            ))),
        }
    }

    /// A handle that tells, for as long as the job runs, whether this
    /// writer's lease is still held (`None` for a reader's record): for
    /// tasks that commit on the job's behalf, such as the packer's index
    /// writes.
    pub fn check(&self) -> Option<LeaseCheck> {
        match &self.access {
            Access::Exclusive(e) => Some(LeaseCheck(e.inner.clone())),
            Access::Shared(_) => None,
        }
    }

    /// The lease record as last written (writers).
    pub async fn record(&self) -> Option<LeaseRecord> {
        match &self.access {
            Access::Exclusive(e) => Some(e.inner.state.lock().await.0.clone()),
            Access::Shared(_) => None,
        }
    }

    /// Releases the lease, or removes the reader record.
    pub async fn release(self) {
        match self.access {
            Access::Exclusive(e) => e.release().await,
            Access::Shared(r) => r.release().await,
        }
    }
}

impl Exclusive {
    async fn acquire(
        store: &TenantStore,
        holder: &str,
        process: Option<ProcessIdentity>,
        job: &str,
        ttl: Duration,
    ) -> Result<Exclusive> {
        let name = ObjectName::Lease;
        for _ in 0..5 {
            let now = Utc::now();
            // Before the write: the record's expiry is no earlier than this plus the TTL.
            let written = BootTime::now();
            let record = LeaseRecord {
                holder: holder.to_owned(),
                job: job.to_owned(),
                acquired_at: now,
                expires_at: now + chrono_ttl(ttl),
                released: false,
                process: process.clone(),
                renewed_at: Some(now),
            };
            let body = Bytes::from(serde_json::to_vec(&record).expect("lease serialises"));
            match store
                .put_conditional(&name, body.clone(), PutMode::Create)
                .await
            {
                Ok(r) => return Ok(Self::start(store, ttl, record, version(&r), None, written)),
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
            let mut why = match &current {
                Some(c) => format!("expired at {}", c.expires_at.to_rfc3339()),
                None => "unreadable lease record".to_owned(),
            };
            if let Some(cur) = &current
                && !released
                && cur.expires_at > now
                && cur.holder != holder
            {
                // Live by its TTL: free at once only if its process is provably gone.
                match cur.liveness() {
                    Liveness::Dead(evidence) => why = format!("dead holder: {evidence}"),
                    Liveness::Alive | Liveness::Unknown => {
                        return Err(Error::LeaseContended {
                            tenant: store.tenant().to_string(),
                            holder: format!("{} ({})", cur.holder, cur.job),
                            expires: cur.expires_at.to_rfc3339(),
                        });
                    }
                }
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
                        return Ok(Self::start(store, ttl, record, version(&r), None, written));
                    }
                    tracing::warn!(
                        event = "lease.takeover",
                        tenant = %store.tenant(),
                        lock = "lease",
                        previous_holder = current.as_ref().map(|c| c.holder.as_str()).unwrap_or("unreadable lease"),
                        previous_expiry = current.as_ref().map(|c| c.expires_at.to_rfc3339()).unwrap_or_default(),
                        reason = %why,
                        "took over the lease ({why})"
                    );
                    let previous = current.map(|c| (c, why));
                    return Ok(Self::start(
                        store,
                        ttl,
                        record,
                        version(&r),
                        previous,
                        written,
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
        took_over_from: Option<(LeaseRecord, String)>,
        written: BootTime,
    ) -> Exclusive {
        let inner = Arc::new(Inner {
            store: store.clone(),
            ttl,
            state: Mutex::new((record, v)),
            lost: AtomicBool::new(false),
            valid_until: std::sync::Mutex::new(written + ttl),
            released: AtomicBool::new(false),
        });
        let keepalive = Keepalive::spawn(&inner, ttl);
        Exclusive {
            inner,
            keepalive,
            took_over_from,
        }
    }

    /// Releases the lease if it is still ours: lets a renewal in flight
    /// finish (for up to a TTL), then marks the lease released with a
    /// conditional update of our own version. Transient store errors are
    /// retried: a lease left held blocks the tenant until it expires.
    async fn release(mut self) {
        self.inner.released.store(true, Ordering::SeqCst);
        // A renewal stuck in retries is cut short after a TTL. Should its
        // write still land, the conflict below finds our own lease and retries.
        self.keepalive.stop(self.inner.ttl).await;
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

/// What `custos unlock` found in the lease object.
#[derive(Debug, Clone)]
pub struct StoredLease {
    /// `None`: the object does not parse as a lease record.
    pub record: Option<LeaseRecord>,
    pub version: UpdateVersion,
}

/// Reads the tenant's lease object, if there is one.
pub async fn read(store: &TenantStore) -> Result<Option<StoredLease>> {
    Ok(store
        .get_if_exists(&ObjectName::Lease)
        .await?
        .map(|(bytes, meta)| StoredLease {
            record: serde_json::from_slice(&bytes).ok(),
            version: UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
        }))
}

/// Marks the lease seen as `seen` released, with a conditional update of
/// that version: a lease renewed or taken over since is left alone (false).
/// Never a delete, so no newer holder's lease can be removed.
pub async fn mark_released(store: &TenantStore, seen: &StoredLease, by: &str) -> Result<bool> {
    let now = Utc::now();
    let record = match &seen.record {
        Some(r) => LeaseRecord {
            released: true,
            expires_at: now,
            ..r.clone()
        },
        None => LeaseRecord {
            holder: by.to_owned(),
            job: "unlock".into(),
            acquired_at: now,
            expires_at: now,
            released: true,
            process: None,
            renewed_at: Some(now),
        },
    };
    let body = Bytes::from(serde_json::to_vec(&record).expect("lease serialises"));
    match store
        .put_conditional(
            &ObjectName::Lease,
            body,
            PutMode::Update(seen.version.clone()),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {
            Ok(false)
        }
        Err(e) => Err(Exclusive::conditional_error(store, e)),
    }
}

/// Renewal (and release) attempts before giving up. Renewals run every third
/// of the TTL, so a few quick retries fit well inside it.
const RENEW_ATTEMPTS: u32 = 4;

impl Inner {
    /// Fails once the lease was lost, or once it is within a tenth of its
    /// TTL of running out unrenewed (a renewal hanging on the store): a
    /// commit checked now may land a little later, and must not land after
    /// another process could have taken the lease.
    fn ensure_held(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseContended {
                tenant: self.store.tenant().to_string(),
                holder: "another process (this job's lease was lost)".into(),
                expires: "unknown".into(),
            });
        }
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::LeaseContended {
                tenant: self.store.tenant().to_string(),
                holder: "nobody yet (this job released its lease)".into(),
                expires: "released".into(),
            });
        }
        let valid_until = *self.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        if BootTime::now() + self.ttl / 10 >= valid_until {
            return Err(Error::LeaseContended {
                tenant: self.store.tenant().to_string(),
                holder: "nobody yet (this job's lease was not renewed in time: it runs out, and another process may take it)".into(),
                expires: "now".into(),
            });
        }
        Ok(())
    }

    fn renewed(&self, written: BootTime) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = written + self.ttl;
    }

    /// Renews the lease. Transient store errors are retried; a renewal whose
    /// response was lost but which was written shows up as a changed version
    /// holding our own record, and is adopted rather than taken for a takeover.
    async fn renew(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let mut record = state.0.clone();
        let now = Utc::now();
        let written = BootTime::now();
        record.expires_at = now + chrono_ttl(self.ttl);
        record.renewed_at = Some(now);
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
                    self.renewed(written);
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
                        self.renewed(written);
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

impl Renew for Inner {
    async fn renew_record(&self) -> std::result::Result<(), String> {
        self.renew().await.map_err(|e| e.to_string())
    }

    fn lost(&self, why: String) {
        tracing::error!(event = "lease.lost", tenant = %self.store.tenant(), error = %why, "lease renewal failed");
        self.lost.store(true, Ordering::SeqCst);
    }
}

impl Drop for Exclusive {
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
        crash(b);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = LeaseGuard::acquire(&s, "c", "backup", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(c.record().await.unwrap().holder, "c");
        assert!(c.takeover_reason().unwrap().starts_with("expired at"));
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

    /// A holder that dies without releasing: its keepalive stops, its record stays.
    fn crash(g: LeaseGuard) {
        match g.access {
            Access::Exclusive(e) => {
                e.keepalive.abort();
                std::mem::forget(e);
            }
            Access::Shared(_) => unreachable!("a lease"),
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
        let mut renewed = a.record().await.unwrap();
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
        let mut other = a.record().await.unwrap();
        other.holder = "b".into();
        put_record(&s, &other).await;
        a.release().await;
        assert_eq!(stored(&s).await.unwrap(), other);
    }

    /// Renewals that never complete (a store that hangs) set no `lost`
    /// flag; the lease is no longer held once its TTL (less a tenth) has
    /// passed since the last write, for the guard and for its checks.
    #[tokio::test]
    async fn a_lease_not_renewed_in_time_is_not_held() {
        let s = tstore();
        let a = LeaseGuard::acquire(&s, "a", "backup", Duration::from_millis(300))
            .await
            .unwrap();
        let check = a.check().unwrap();
        let Access::Exclusive(e) = &a.access else {
            unreachable!("a lease")
        };
        e.keepalive.abort();
        a.ensure_held().unwrap();
        check.ensure_held().unwrap();
        tokio::time::sleep(Duration::from_millis(280)).await;
        assert!(!e.inner.lost.load(Ordering::SeqCst));
        assert_eq!(a.ensure_held().unwrap_err().kind(), "lease_contended");
        assert_eq!(check.ensure_held().unwrap_err().kind(), "lease_contended");
    }

    /// What checks the lease for the job fails once the job released it.
    #[tokio::test]
    async fn a_released_lease_is_not_held_by_its_checks() {
        let s = tstore();
        let a = take(&s, "a").await;
        let check = a.check().unwrap();
        check.ensure_held().unwrap();
        a.release().await;
        assert_eq!(check.ensure_held().unwrap_err().kind(), "lease_contended");
    }

    /// The boot clock moves on at least as far as a sleep (and, unlike
    /// `Instant`, across a suspend of the host, which a test cannot make).
    #[test]
    fn the_boot_clock_moves_on() {
        let before = BootTime::now();
        std::thread::sleep(Duration::from_millis(20));
        let after = BootTime::now();
        assert!(
            after >= before + Duration::from_millis(20),
            "{before:?} {after:?}"
        );
    }

    /// A renewal moves the deadline on.
    #[tokio::test]
    async fn a_renewed_lease_stays_held_past_its_first_ttl() {
        let s = tstore();
        let a = LeaseGuard::acquire(&s, "a", "backup", Duration::from_millis(300))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.ensure_held().unwrap();
        a.release().await;
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

    /// A lease of a process `sleep` of this host, as it would write it.
    fn lease_of(pid: u32, start_time: u64) -> LeaseRecord {
        let now = Utc::now();
        LeaseRecord {
            holder: format!("{}:{pid}:0000", hostname()),
            job: "backup".into(),
            acquired_at: now,
            expires_at: now + chrono::Duration::hours(1),
            released: false,
            process: Some(ProcessIdentity {
                pid,
                start_time,
                ..holder::current().unwrap().clone()
            }),
            renewed_at: Some(now),
        }
    }

    /// Nothing waits for a dead process of this host: a lease whose pid is
    /// gone, or now belongs to another process (another start time), is taken
    /// over at once, an hour before it expires; a live holder's is not, nor
    /// is a record without a process identity (an older version's).
    #[tokio::test]
    async fn a_dead_holders_lease_is_taken_over_at_once_a_live_ones_is_not() {
        let s = tstore();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        let holder::ProcState::Running { start_time } = holder::probe(pid) else {
            panic!("sleep runs")
        };
        // Live holder: contended.
        put_record(&s, &lease_of(pid, start_time)).await;
        let err = LeaseGuard::acquire(&s, "b", "check", Duration::from_secs(60))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), "lease_contended");
        // The same pid under another start time: a reused pid, the holder is gone.
        put_record(&s, &lease_of(pid, start_time + 7)).await;
        let b = take(&s, "b").await;
        assert!(
            b.takeover_reason()
                .unwrap()
                .contains("now belongs to another process"),
            "{:?}",
            b.takeover_reason()
        );
        assert_eq!(
            b.took_over_from().unwrap().process.as_ref().unwrap().pid,
            pid
        );
        b.release().await;
        // The process exits: its lease is free at once.
        put_record(&s, &lease_of(pid, start_time)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let c = take(&s, "c").await;
        assert!(
            c.takeover_reason().unwrap().contains("no longer exists"),
            "{:?}",
            c.takeover_reason()
        );
        c.release().await;
        // An old-format record (no process identity) waits for its TTL.
        let mut old = lease_of(pid, start_time);
        old.process = None;
        put_record(&s, &old).await;
        let err = LeaseGuard::acquire(&s, "d", "check", Duration::from_secs(60))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), "lease_contended");
    }

    /// `custos unlock` marks the lease released only if it is still the
    /// version it saw: a renewal in between keeps the lease.
    #[tokio::test]
    async fn mark_released_is_conditional_on_the_version_seen() {
        let s = tstore();
        let a = take(&s, "a").await;
        let seen = read(&s).await.unwrap().unwrap();
        // a renews (a new version of its record) before the unlock writes.
        let mut renewed = a.record().await.unwrap();
        renewed.expires_at += chrono::Duration::seconds(20);
        put_record(&s, &renewed).await;
        assert!(!mark_released(&s, &seen, "unlock").await.unwrap());
        assert_eq!(stored(&s).await.unwrap(), renewed, "left alone");
        let seen = read(&s).await.unwrap().unwrap();
        assert!(mark_released(&s, &seen, "unlock").await.unwrap());
        let r = stored(&s).await.unwrap();
        assert!(r.released && r.holder == "a", "{r:?}");
        // A new holder gets the lease at once, without a crash report.
        let b = take(&s, "b").await;
        assert!(b.took_over_from().is_none(), "a released lease is free");
        // An unreadable lease object is replaced by a released record.
        s.put(&ObjectName::Lease, Bytes::from_static(b"garbage"))
            .await
            .unwrap();
        let seen = read(&s).await.unwrap().unwrap();
        assert!(seen.record.is_none());
        assert!(mark_released(&s, &seen, "unlock").await.unwrap());
        assert!(stored(&s).await.unwrap().released);
        crash(a);
    }

    /// A reader's guard can never commit.
    #[tokio::test]
    async fn a_shared_guard_cannot_commit() {
        let s = tstore();
        let r = ReaderGuard::register(&s, "r", "restore", Duration::from_secs(60))
            .await
            .unwrap();
        let g = LeaseGuard::shared(r);
        assert!(!g.is_exclusive());
        assert_eq!(g.ensure_held().unwrap_err().kind(), "internal");
        assert!(g.reader().unwrap().check().is_ok());
        g.release().await;
    }
}

//! A fault-injecting object store, in the style of `object_store`'s
//! `ThrottledStore`: wraps any store and, by probability and by operation,
//! adds latency, times out, fails with transient (5xx-like) errors, returns
//! short reads and fails multipart completions. Seeded, so a campaign's
//! fault *rates* reproduce (the exact interleaving depends on concurrency).
//!
//! Used by the fault tests (`tests/it/faults.rs`) and, for manual testing, by
//! any command run with `CUSTOS_FAULTS` set (see [`FaultConfig::parse`]):
//!
//! ```text
//! CUSTOS_FAULTS="seed=7,error=0.05,timeout=0.01,short_read=0.05" custos backup acme
//! ```
//!
//! Injected failures are `object_store::Error::Generic`, the class the HTTP
//! stores return once their own retries are spent (network, 5xx, throttling),
//! which custos treats as transient. Half of the failed puts fail *after*
//! the object was written (a response lost on the way back), the case that
//! tests idempotent retries.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

use super::SharedStore;

/// The operations faults can be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
    Multipart,
    Copy,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "put" => Op::Put,
            "get" => Op::Get,
            "head" => Op::Head,
            "list" => Op::List,
            "delete" => Op::Delete,
            "multipart" => Op::Multipart,
            "copy" => Op::Copy,
            _ => return None,
        })
    }
}

/// What to inject, with which probability (0.0–1.0 per operation).
#[derive(Debug, Clone)]
pub struct FaultConfig {
    pub seed: u64,
    /// A transient error (as after a 500/503 the client gave up on).
    pub error: f64,
    /// The operation hangs for `timeout_after`, then fails as timed out.
    pub timeout: f64,
    pub timeout_after: Duration,
    /// Extra latency, uniform in 0..`latency_max`.
    pub latency: f64,
    pub latency_max: Duration,
    /// A read returns fewer bytes than asked, without an error.
    pub short_read: f64,
    /// A multipart upload fails at completion.
    pub multipart: f64,
    /// Operations affected (all when empty).
    pub ops: Vec<Op>,
    /// Only paths containing this text are affected (all when None).
    pub paths: Option<String>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            error: 0.0,
            timeout: 0.0,
            timeout_after: Duration::from_millis(200),
            latency: 0.0,
            latency_max: Duration::from_millis(20),
            short_read: 0.0,
            multipart: 0.0,
            ops: Vec::new(),
            paths: None,
        }
    }
}

impl FaultConfig {
    /// Parses `key=value` pairs separated by commas: `seed`, `error`,
    /// `timeout`, `timeout_after`, `latency`, `latency_max`, `short_read`,
    /// `multipart` (probabilities 0–1 or durations), `ops=put+get+head+list+
    /// delete+multipart+copy`, `paths=<text a path must contain>`. A bare
    /// `rate=<p>` sets error, timeout and short_read to p/3 each.
    pub fn parse(spec: &str) -> std::result::Result<FaultConfig, String> {
        let mut c = FaultConfig::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            let prob = || -> std::result::Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("{k}: {v:?} is not a probability from 0 to 1"))
            };
            let dur = || crate::config::units::parse_duration(v).map_err(|e| format!("{k}: {e}"));
            match k {
                "seed" => c.seed = v.parse().map_err(|_| format!("seed: {v:?}"))?,
                "error" => c.error = prob()?,
                "timeout" => c.timeout = prob()?,
                "timeout_after" => c.timeout_after = dur()?,
                "latency" => c.latency = prob()?,
                "latency_max" => c.latency_max = dur()?,
                "short_read" => c.short_read = prob()?,
                "multipart" => c.multipart = prob()?,
                "rate" => {
                    let p = prob()?;
                    (c.error, c.timeout, c.short_read) = (p / 3.0, p / 3.0, p / 3.0);
                }
                "ops" => {
                    c.ops = v
                        .split('+')
                        .map(|o| Op::parse(o).ok_or_else(|| format!("ops: unknown {o:?}")))
                        .collect::<std::result::Result<_, _>>()?
                }
                "paths" => c.paths = Some(v.to_owned()),
                _ => return Err(format!("unknown fault setting {k:?}")),
            }
        }
        Ok(c)
    }
}

impl FaultConfig {
    fn applies(&self, op: Op, path: &Path) -> bool {
        (self.ops.is_empty() || self.ops.contains(&op))
            && self
                .paths
                .as_deref()
                .is_none_or(|p| path.as_ref().contains(p))
    }
}

/// splitmix64 over a shared state, as a uniform number in [0, 1).
fn uniform(rng: &Mutex<u64>) -> f64 {
    let mut s = rng.lock().unwrap_or_else(|p| p.into_inner());
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// How many faults of each kind were injected.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub short_reads: AtomicU64,
    pub multipart_failures: AtomicU64,
    pub delays: AtomicU64,
}

impl FaultStats {
    pub fn total(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
            + self.timeouts.load(Ordering::Relaxed)
            + self.short_reads.load(Ordering::Relaxed)
            + self.multipart_failures.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: SharedStore,
    cfg: Arc<FaultConfig>,
    rng: Arc<Mutex<u64>>,
    stats: Arc<FaultStats>,
}

/// What to do to one operation.
enum Plan {
    Pass,
    Fail,
    /// Put only: write, then report a failure.
    FailAfter,
    Timeout,
    ShortRead,
}

impl FaultyStore {
    pub fn new(inner: SharedStore, cfg: FaultConfig) -> Self {
        FaultyStore {
            inner,
            rng: Arc::new(Mutex::new(cfg.seed ^ 0x5eed_fa17_5eed_fa17)),
            cfg: Arc::new(cfg),
            stats: Default::default(),
        }
    }

    /// Counters of what was injected (shared; stays valid after moving the store).
    pub fn stats(&self) -> Arc<FaultStats> {
        self.stats.clone()
    }

    fn uniform(&self) -> f64 {
        uniform(&self.rng)
    }

    fn applies(&self, op: Op, path: &Path) -> bool {
        self.cfg.applies(op, path)
    }

    /// Draws latency and a fault for one operation on `path`. Half of the
    /// latency is spent here, on the way to the store; the other half is
    /// returned, to be spent after the operation, on the way back: a caller
    /// that gives up then has had its write done all the same.
    async fn plan(&self, op: Op, path: &Path) -> (Plan, Duration) {
        if !self.applies(op, path) {
            return (Plan::Pass, Duration::ZERO);
        }
        let mut response = Duration::ZERO;
        if self.cfg.latency > 0.0 && self.uniform() < self.cfg.latency {
            self.stats.delays.fetch_add(1, Ordering::Relaxed);
            let d = self.cfg.latency_max.mul_f64(self.uniform());
            response = d / 2;
            tokio::time::sleep(d - response).await;
        }
        let x = self.uniform();
        let (e, t, s) = (self.cfg.error, self.cfg.timeout, self.cfg.short_read);
        let plan = if x < e {
            if op == Op::Put && self.uniform() < 0.5 {
                Plan::FailAfter
            } else {
                Plan::Fail
            }
        } else if x < e + t {
            Plan::Timeout
        } else if x < e + t + s && matches!(op, Op::Get) {
            Plan::ShortRead
        } else {
            Plan::Pass
        };
        (plan, response)
    }

    fn error(&self, what: &str, op: Op, path: &Path) -> object_store::Error {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        injected(format!(
            "injected fault: {what} ({op:?} {path}): 503 Slow Down"
        ))
    }

    async fn timeout(&self, op: Op, path: &Path) -> object_store::Error {
        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.cfg.timeout_after).await;
        injected(format!(
            "injected fault: {op:?} {path}: operation timed out"
        ))
    }

    /// Applies a plan that is not a short read to an operation.
    async fn guard<R>(&self, op: Op, path: &Path, f: impl Future<Output = Result<R>>) -> Result<R> {
        let (plan, response) = self.plan(op, path).await;
        match plan {
            Plan::Fail => Err(self.error("request failed", op, path)),
            Plan::Timeout => Err(self.timeout(op, path).await),
            Plan::FailAfter => {
                let r = f.await;
                match r {
                    Ok(_) => Err(self.error("response lost after the write", op, path)),
                    Err(e) => Err(e),
                }
            }
            Plan::Pass | Plan::ShortRead => {
                let r = f.await;
                tokio::time::sleep(response).await;
                r
            }
        }
    }
}

fn injected(msg: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: msg.into(),
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.guard(
            Op::Put,
            location,
            self.inner.put_opts(location, payload, opts),
        )
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let upload = self
            .guard(
                Op::Multipart,
                location,
                self.inner.put_multipart_opts(location, opts),
            )
            .await?;
        let fail = self.applies(Op::Multipart, location)
            && self.cfg.multipart > 0.0
            && self.uniform() < self.cfg.multipart;
        Ok(Box::new(FaultyUpload {
            inner: upload,
            fail,
            path: location.to_string(),
            stats: self.stats.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        let (plan, response) = self.plan(op, location).await;
        tokio::time::sleep(response).await;
        match plan {
            Plan::Fail | Plan::FailAfter => Err(self.error("request failed", op, location)),
            Plan::Timeout => Err(self.timeout(op, location).await),
            Plan::Pass => self.inner.get_opts(location, options).await,
            Plan::ShortRead => {
                let result = self.inner.get_opts(location, options).await?;
                if result.range.is_empty() {
                    return Ok(result);
                }
                self.stats.short_reads.fetch_add(1, Ordering::Relaxed);
                let (meta, range, attributes, extensions) = (
                    result.meta.clone(),
                    result.range.clone(),
                    result.attributes.clone(),
                    result.extensions.clone(),
                );
                let mut bytes = result.bytes().await?;
                let keep = (self.uniform() * bytes.len() as f64) as usize;
                bytes.truncate(keep.min(bytes.len().saturating_sub(1)));
                let body = futures::stream::once(async { Ok(bytes) }).boxed();
                Ok(GetResult {
                    payload: GetResultPayload::Stream(body),
                    meta,
                    range,
                    attributes,
                    extensions,
                })
            }
        }
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let (plan, response) = self.plan(Op::Get, location).await;
        tokio::time::sleep(response).await;
        match plan {
            Plan::Fail | Plan::FailAfter => Err(self.error("request failed", Op::Get, location)),
            Plan::Timeout => Err(self.timeout(Op::Get, location).await),
            Plan::Pass => self.inner.get_ranges(location, ranges).await,
            Plan::ShortRead => {
                let mut parts = self.inner.get_ranges(location, ranges).await?;
                if let Some(p) = parts.iter_mut().find(|p| !p.is_empty()) {
                    self.stats.short_reads.fetch_add(1, Ordering::Relaxed);
                    let keep = (self.uniform() * p.len() as f64) as usize;
                    p.truncate(keep.min(p.len() - 1));
                }
                Ok(parts)
            }
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // One location at a time, so a location that draws a fault never
        // reaches the inner store.
        let (inner, cfg, rng, stats) = (
            self.inner.clone(),
            self.cfg.clone(),
            self.rng.clone(),
            self.stats.clone(),
        );
        locations
            .then(move |r| {
                let (inner, cfg, rng, stats) =
                    (inner.clone(), cfg.clone(), rng.clone(), stats.clone());
                async move {
                    let p = r?;
                    if cfg.applies(Op::Delete, &p) && uniform(&rng) < cfg.error + cfg.timeout {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(injected(format!(
                            "injected fault: delete {p}: 503 Slow Down"
                        )));
                    }
                    let one = futures::stream::once(async move { Ok(p) }).boxed();
                    match inner.delete_stream(one).next().await {
                        Some(r) => r,
                        None => Err(injected("delete returned nothing".into())),
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let p = prefix.cloned().unwrap_or_default();
        if self.applies(Op::List, &p) && self.uniform() < self.cfg.error + self.cfg.timeout {
            let e = self.error("list failed", Op::List, &p);
            return futures::stream::once(async { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let p = prefix.cloned().unwrap_or_default();
        if self.applies(Op::List, &p) && self.uniform() < self.cfg.error + self.cfg.timeout {
            let e = self.error("list failed", Op::List, &p);
            return futures::stream::once(async { Err(e) }).boxed();
        }
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let p = prefix.cloned().unwrap_or_default();
        self.guard(Op::List, &p, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.guard(Op::Copy, to, self.inner.copy_opts(from, to, options))
            .await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.guard(Op::Copy, to, self.inner.rename_opts(from, to, options))
            .await
    }
}

/// A multipart upload whose completion fails when drawn so.
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    fail: bool,
    path: String,
    stats: Arc<FaultStats>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        if self.fail {
            self.stats
                .multipart_failures
                .fetch_add(1, Ordering::Relaxed);
            // The upload is abandoned, as when CompleteMultipartUpload fails.
            let _ = self.inner.abort().await;
            return Err(injected(format!(
                "injected fault: completing the multipart upload of {}: 500 Internal Error",
                self.path
            )));
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

/// Wraps `store` when `CUSTOS_FAULTS` is set (manual testing; see the module docs).
pub fn from_env(store: crate::store::SharedStore) -> crate::Result<crate::store::SharedStore> {
    let Ok(spec) = std::env::var("CUSTOS_FAULTS") else {
        return Ok(store);
    };
    let cfg = FaultConfig::parse(&spec).map_err(|m| crate::Error::StoreConfig {
        url: "CUSTOS_FAULTS".into(),
        message: m,
    })?;
    tracing::warn!(event = "store.faults", spec = %spec, "injecting store faults (CUSTOS_FAULTS is set)");
    Ok(Arc::new(FaultyStore::new(store, cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[test]
    fn parses_specs() {
        let c = FaultConfig::parse("seed=3,error=0.1,timeout=0.05,timeout_after=10ms,latency=0.5,latency_max=5ms,short_read=0.2,multipart=1,ops=put+get,paths=packs/").unwrap();
        assert_eq!(c.seed, 3);
        assert_eq!(c.ops, vec![Op::Put, Op::Get]);
        assert_eq!(c.timeout_after, Duration::from_millis(10));
        assert_eq!(c.paths.as_deref(), Some("packs/"));
        assert!(FaultConfig::parse("error=2").is_err());
        assert!(FaultConfig::parse("bogus=1").is_err());
        assert!(FaultConfig::parse("ops=frob").is_err());
        let r = FaultConfig::parse("rate=0.3").unwrap();
        assert!((r.error - 0.1).abs() < 1e-9 && (r.short_read - 0.1).abs() < 1e-9);
    }

    #[tokio::test]
    async fn injects_each_kind() {
        let inner: SharedStore = Arc::new(object_store::memory::InMemory::new());
        let p = Path::from("a/b");
        inner
            .put(&p, Bytes::from(vec![7u8; 1000]).into())
            .await
            .unwrap();
        let always = |f: fn(&mut FaultConfig)| {
            let mut c = FaultConfig {
                timeout_after: Duration::from_millis(1),
                ..Default::default()
            };
            f(&mut c);
            c
        };
        let s = FaultyStore::new(inner, always(|c| c.error = 1.0));
        assert!(matches!(
            s.get(&p).await,
            Err(object_store::Error::Generic { .. })
        ));
        assert!(s.list(None).next().await.unwrap().is_err());
        let s = FaultyStore::new(s.inner.clone(), always(|c| c.short_read = 1.0));
        let got = s.get(&p).await.unwrap().bytes().await.unwrap();
        assert!(got.len() < 1000);
        let parts = s
            .get_ranges(&p, std::slice::from_ref(&(0..100)))
            .await
            .unwrap();
        assert!(parts[0].len() < 100);
        assert_eq!(s.stats().short_reads.load(Ordering::Relaxed), 2);
        let s = FaultyStore::new(s.inner.clone(), always(|c| c.multipart = 1.0));
        let mut up = s.put_multipart(&Path::from("m")).await.unwrap();
        up.put_part(Bytes::from_static(b"x").into()).await.unwrap();
        assert!(up.complete().await.is_err());
        assert!(s.head(&Path::from("m")).await.is_err(), "nothing completed");
        // Path filter: only matching paths fail.
        let s = FaultyStore::new(
            s.inner.clone(),
            always(|c| {
                c.error = 1.0;
                c.paths = Some("x/".into());
            }),
        );
        s.get(&p).await.unwrap();
        assert!(s.delete(&p).await.is_ok(), "other paths are left alone");
        let s = FaultyStore::new(s.inner.clone(), always(|c| c.timeout = 1.0));
        assert!(s.head(&p).await.is_err());
        assert_eq!(s.stats().timeouts.load(Ordering::Relaxed), 1);
    }
}

//! Probes whether a store honours conditional writes. Some S3 clones (garage)
//! accept `If-None-Match: *` and silently overwrite; leases on such a store
//! would let two daemons run one tenant's jobs at once, and descriptor updates
//! could silently lose one another.
//!
//! Everything that relies on conditional writes (every job that takes a lease,
//! tenant initialisation, descriptor updates) calls
//! [`require_conditional_writes`] first and refuses to run on a store that
//! failed the probe. The result is cached per store URL in the state directory
//! (`<state>/probes/<hash>.json`) and re-probed after [`PROBE_MAX_AGE`], so
//! not every CLI call pays the probe's four requests.

use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::SharedStore;
use crate::error::{Error, Result};

/// How long a cached probe result is trusted.
pub const PROBE_MAX_AGE: Duration = Duration::from_secs(86_400);

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionalWrites {
    /// A second `PutMode::Create` on the same name failed with `AlreadyExists`.
    pub create_exclusive: bool,
    /// A `PutMode::Update` with a stale e-tag failed with `Precondition`.
    pub update_checked: bool,
    /// What went wrong, when something did.
    pub detail: Option<String>,
    /// The store answered every request, so the finding is about the store,
    /// not about the network (only conclusive results are cached).
    #[serde(default)]
    pub conclusive: bool,
}

impl ConditionalWrites {
    pub fn supported(&self) -> bool {
        self.create_exclusive && self.update_checked
    }
}

/// Writes and removes two small objects under `probe/` (outside tenant
/// prefixes). Fails (`store_error`, or `insufficient_space`) when the store
/// cannot be written at all (a read-only file system, no space, no
/// permission): that says nothing about conditional writes, and retrying
/// does not help.
pub async fn probe_conditional_writes(store: &SharedStore) -> Result<ConditionalWrites> {
    let path = Path::from(format!(
        "probe/conditional-{}",
        hex::encode(crate::util::random_bytes::<8>())
    ));
    let result = run(store, &path).await;
    let _ = store.delete(&path).await;
    result.map_err(|e| Error::store("probe", &path, e))
}

async fn run(
    store: &SharedStore,
    path: &Path,
) -> std::result::Result<ConditionalWrites, object_store::Error> {
    let opts = |mode| PutOptions {
        mode,
        ..Default::default()
    };
    let mut out = ConditionalWrites {
        create_exclusive: false,
        update_checked: false,
        detail: None,
        conclusive: false,
    };
    // A store that cannot be written at all (read-only, full, no permission)
    // fails the probe as a store error, not as a finding about conditional writes.
    let unwritable = |e: &object_store::Error| super::local::permanent_os_error(e).is_some();
    // A store that says it cannot do conditional writes has answered.
    let refuses = |e: &object_store::Error| {
        matches!(
            e,
            object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }
        )
    };
    let first = match store
        .put_opts(path, PutPayload::from_static(b"1"), opts(PutMode::Create))
        .await
    {
        Ok(r) => r,
        Err(e) if unwritable(&e) => return Err(e),
        Err(e) => {
            out.conclusive = refuses(&e);
            out.detail = Some(format!("conditional create failed: {e}"));
            return Ok(out);
        }
    };
    match store
        .put_opts(path, PutPayload::from_static(b"2"), opts(PutMode::Create))
        .await
    {
        Err(object_store::Error::AlreadyExists { .. }) => out.create_exclusive = true,
        Ok(_) => {
            out.conclusive = true;
            out.detail = Some(
                "a second create-if-absent of the same object succeeded (If-None-Match ignored)"
                    .into(),
            );
            return Ok(out);
        }
        Err(e) if unwritable(&e) => return Err(e),
        Err(e) => {
            out.detail = Some(format!(
                "second conditional create failed unexpectedly: {e}"
            ));
            return Ok(out);
        }
    }
    let current = UpdateVersion {
        e_tag: first.e_tag.clone(),
        version: first.version.clone(),
    };
    let second = match store
        .put_opts(
            path,
            PutPayload::from_static(b"3"),
            opts(PutMode::Update(current.clone())),
        )
        .await
    {
        Ok(r) => r,
        Err(e) if unwritable(&e) => return Err(e),
        Err(e) => {
            out.conclusive = refuses(&e);
            out.detail = Some(format!("conditional update failed: {e}"));
            return Ok(out);
        }
    };
    if second.e_tag == first.e_tag && second.version == first.version {
        out.conclusive = true;
        out.detail = Some("an update did not change the object's e-tag or version".into());
        return Ok(out);
    }
    match store
        .put_opts(
            path,
            PutPayload::from_static(b"4"),
            opts(PutMode::Update(current)),
        )
        .await
    {
        Err(object_store::Error::Precondition { .. }) => {
            out.update_checked = true;
            out.conclusive = true;
        }
        Ok(_) => {
            out.conclusive = true;
            out.detail = Some("an update with a stale e-tag succeeded (If-Match ignored)".into())
        }
        Err(e) if unwritable(&e) => return Err(e),
        Err(e) => {
            out.conclusive = refuses(&e);
            out.detail = Some(format!("stale conditional update failed unexpectedly: {e}"))
        }
    }
    Ok(out)
}

/// A probe result as cached in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// The store as configured (`file:///…`, `s3://bucket/prefix`).
    pub url: String,
    pub probed_at: DateTime<Utc>,
    #[serde(flatten)]
    pub result: ConditionalWrites,
    /// True when read from the cache rather than probed now.
    #[serde(skip_deserializing)]
    pub cached: bool,
}

impl ProbeRecord {
    pub fn supported(&self) -> bool {
        self.result.supported()
    }
}

/// Probes before an inconclusive result is reported (transient errors).
const PROBE_ATTEMPTS: u32 = 4;

/// The store to probe and where its result is cached: what the caller (a
/// job's context) knows, passed down so that the store layer needs nothing
/// above it.
#[derive(Clone, Copy)]
pub struct ProbeTarget<'a> {
    pub store: &'a SharedStore,
    /// The store as configured; the cache is keyed by it.
    pub url: &'a str,
    /// The state directory (`<state>/probes/` holds the cache).
    pub state_dir: &'a std::path::Path,
}

impl ProbeTarget<'_> {
    fn cache_dir(&self) -> std::path::PathBuf {
        self.state_dir.join("probes")
    }

    fn cache_path(&self) -> std::path::PathBuf {
        let hash = blake3::hash(self.url.as_bytes());
        self.cache_dir()
            .join(format!("{}.json", &hash.to_hex()[..32]))
    }
}

/// The store's probe result: from the cache when it is younger than
/// [`PROBE_MAX_AGE`] (and `refresh` is false), else probed now and cached if
/// conclusive.
pub async fn probe_cached<'a>(
    target: impl Into<ProbeTarget<'a>>,
    refresh: bool,
) -> Result<ProbeRecord> {
    let target = target.into();
    let path = target.cache_path();
    let now = Utc::now();
    if !refresh
        && let Ok(bytes) = std::fs::read(&path)
        && let Ok(mut rec) = serde_json::from_slice::<ProbeRecord>(&bytes)
        && rec.url == target.url
        && rec.probed_at <= now
        && (now - rec.probed_at).to_std().unwrap_or(Duration::MAX) < PROBE_MAX_AGE
    {
        rec.cached = true;
        return Ok(rec);
    }
    // An inconclusive probe (a transient store error on the way) is retried:
    // one 5xx must not make a job fail as if the store were misconfigured.
    let mut result = probe_conditional_writes(target.store).await?;
    let mut delay = Duration::from_millis(200);
    for _ in 1..PROBE_ATTEMPTS {
        if result.conclusive {
            break;
        }
        tracing::debug!(
            detail = result.detail.as_deref(),
            "inconclusive store probe; retrying"
        );
        tokio::time::sleep(delay).await;
        delay *= 3;
        result = probe_conditional_writes(target.store).await?;
    }
    let rec = ProbeRecord {
        url: target.url.to_owned(),
        probed_at: now,
        result,
        cached: false,
    };
    if rec.result.conclusive {
        tracing::info!(
            event = "store.probed",
            store = %rec.url,
            conditional_writes = rec.supported(),
            detail = rec.result.detail.as_deref(),
            "probed the store's conditional writes"
        );
        let dir = target.cache_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let json = serde_json::to_vec_pretty(&rec)
            .map_err(|e| Error::Internal(format!("probe record: {e}")))?;
        crate::util::write_file_atomic(&path, &json, 0o600).map_err(|e| Error::io(&path, e))?;
    }
    Ok(rec)
}

/// Fails unless the store honours conditional writes (see the module doc).
pub async fn require_conditional_writes<'a>(target: impl Into<ProbeTarget<'a>>) -> Result<()> {
    let rec = probe_cached(target, false).await?;
    if rec.supported() {
        return Ok(());
    }
    let detail = rec.result.detail.clone().unwrap_or_default();
    if !rec.result.conclusive {
        return Err(Error::StoreConfig {
            url: rec.url,
            message: format!("could not probe the store's conditional writes: {detail}"),
        });
    }
    Err(Error::ConditionalWritesUnsupported {
        url: rec.url,
        message: format!(
            "{detail}; leases and descriptor updates would not be safe, so custos refuses to write \
             to this store (see `custos store probe`)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_and_local_stores_pass() {
        assert!(
            probe_conditional_writes(&super::super::memory())
                .await
                .unwrap()
                .supported()
        );
        let dir = tempfile::tempdir().unwrap();
        let local = super::super::local::open(dir.path()).unwrap();
        let r = probe_conditional_writes(&local).await.unwrap();
        assert!(r.supported(), "{r:?}");
    }
}

//! The audit log on disk, its appends, checkpoints and replication.
//!
//! ```text
//! <state_dir>/audit/log.jsonl            one canonical record per line (the source of truth)
//! <state_dir>/audit/checkpoints/<size>   signed checkpoint of the first <size> records
//! <state_dir>/audit/tail.json            cache: size, byte length, last line hash,
//!                                        Merkle frontier, segment offsets
//! <state_dir>/audit/replicated.json      how far the store copy is known to reach
//! <state_dir>/audit/lock                 flock serialising appends across processes
//! ```
//!
//! and in the store, outside every tenant's prefix:
//!
//! ```text
//! audit/log/<first seq, 20 digits>.jsonl   segments of SEGMENT_RECORDS records
//!                                          (the last one is rewritten until full)
//! audit/checkpoints/<size, 20 digits>      the signed checkpoints
//! ```
//!
//! An append takes the exclusive lock, writes and fsyncs the line, signs a
//! checkpoint for the new size (O(log n) through the cached frontier) and
//! then copies what the store lacks. The store is a replica: if it is down
//! the append still succeeds, the failure is logged, and the next append (or
//! [`AuditLog::replicate`]) catches up.
//!
//! Durability: the line and its checkpoint are fsynced; the tail cache and
//! the replication marker are only replaced atomically (they can be
//! recomputed). Recovery: a crash can leave a torn last line (removed: it was
//! never acknowledged), records whose cache update was lost (kept: they chain
//! on and their signed checkpoints match), and at most one last record whose
//! checkpoint is missing (completed: it is the next record of the chain).
//! Anything else that does not match the cache (a shorter log, unknown or
//! unchained lines) is refused with a pointer to `custos audit verify`:
//! custos does not sign what it cannot account for. Nor does it continue a
//! log shorter than the store copy it made (`replicated.json`), and the
//! replication never shrinks or rewrites the store copy: after a cut of the
//! local log, the store copy keeps the evidence (see `verify`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::PutPayload;
use object_store::path::Path as StorePath;
use serde::{Deserialize, Serialize};

use super::checkpoint::SignedCheckpoint;
use super::evidence::{InclusionEvidence, InclusionProof};
use super::health::AuditHealth;
use super::key::AuditKey;
use super::merkle::{self, Frontier, Hash};
use super::record::{self, AuditRecord, GENESIS_PREV};
use crate::error::{Error, Result};
use crate::store::SharedStore;
use crate::tenant::TenantId;
use crate::util::{sync_dir, write_file_atomic};

/// Records per store segment.
pub const SEGMENT_RECORDS: u64 = 1000;

pub const LOG_FILE: &str = "log.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoints";
pub(crate) const TAIL_FILE: &str = "tail.json";
pub use super::pending::PENDING_FILE;
pub(crate) const REPLICATED_FILE: &str = "replicated.json";
const LOCK_FILE: &str = "lock";
const TAIL_FORMAT: &str = "custos-audit-tail/1";
/// How long one store request of the replication may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// The audit directory under a state directory: `<state_dir>/audit`.
pub fn audit_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

/// `audit/log/<first seq>.jsonl` in the store.
pub fn store_segment_path(first_seq: u64) -> StorePath {
    StorePath::from(format!("audit/log/{first_seq:020}.jsonl"))
}

/// `audit/checkpoints/<size>` in the store.
pub fn store_checkpoint_path(size: u64) -> StorePath {
    StorePath::from(format!("audit/checkpoints/{size:020}"))
}

/// What an append returns: where the record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub leaf_hash: Hash,
    /// The tree size of the checkpoint signed by this append (`seq + 1`).
    pub tree_size: u64,
}

/// The copy of an append to the store, still to be made (see
/// [`AuditLog::append_deferring_replication`]). Holds the log's lock.
#[must_use = "holds the audit log's lock until run or dropped"]
pub struct Replication {
    inner: Arc<Inner>,
    plan: Option<Plan>,
    _lock: LogLock,
}

impl Replication {
    /// The failure counts of the log this copies.
    pub fn health(&self) -> Arc<AuditHealth> {
        self.inner.health.clone()
    }

    /// Copies the append to the store; a failure is counted and logged, not
    /// returned. Releases the log's lock.
    pub async fn run(self) {
        if let Some(plan) = self.plan
            && let Err(e) = self.inner.execute(plan).await
        {
            self.inner.health.replication_failed();
            tracing::warn!(
                event = "audit.replication_failed",
                error = %e,
                error_kind = %e.kind(),
                "audit log not replicated to the store; retrying on the next append"
            );
        }
    }
}

/// The tamper-evident audit log. Cheap to clone; every clone appends to the
/// same files, serialised (with other processes) by an exclusive flock.
///
/// `append`, `replicate` and `sign_checkpoint` are async and keep file work
/// off the runtime. The read methods (`size`, `checkpoint`, `read_lines`,
/// `inclusion_proof`, `evidence`) do blocking file I/O (O(n) for proofs) but
/// take no lock: appends only ever add to the log, and the tail cache is
/// replaced atomically after the line and its checkpoint are durable, so it
/// is always a consistent snapshot. (Only a missing cache makes a reader
/// take the lock to rebuild it.)
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    key: AuditKey,
    replica: Option<SharedStore>,
    /// The replica's root directory when it is a local store: where an
    /// upload killed half-way leaves a `<name>#<n>` staging file.
    local_root: Option<PathBuf>,
    /// Failure counts, shared with whoever watches them (the daemon's metrics).
    health: Arc<AuditHealth>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.inner.dir)
            .field("key", &self.inner.key)
            .field("replicated", &self.inner.replica.is_some())
            .finish()
    }
}

/// The cached end of the log.
#[derive(Debug, Clone)]
struct Tail {
    size: u64,
    log_bytes: u64,
    last_line_hash: Hash,
    frontier: Frontier,
    /// Byte offset of record `i * SEGMENT_RECORDS`, for every started segment.
    segment_offsets: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TailFile {
    format: String,
    size: u64,
    log_bytes: u64,
    last_line_hash: String,
    frontier: Vec<String>,
    segment_offsets: Vec<u64>,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replicated {
    records: u64,
    checkpoints: u64,
}

impl Tail {
    fn empty() -> Self {
        Tail {
            size: 0,
            log_bytes: 0,
            last_line_hash: [0; 32],
            frontier: Frontier::new(),
            segment_offsets: Vec::new(),
        }
    }

    fn prev_hex(&self) -> String {
        if self.size == 0 {
            GENESIS_PREV.to_owned()
        } else {
            hex::encode(self.last_line_hash)
        }
    }

    /// Accounts for one more line (without its newline) at the end of the log.
    fn push(&mut self, line: &[u8]) {
        if self.size.is_multiple_of(SEGMENT_RECORDS) {
            self.segment_offsets.push(self.log_bytes);
        }
        self.frontier.push(record::leaf_hash(line));
        self.last_line_hash = record::line_hash(line);
        self.log_bytes += line.len() as u64 + 1;
        self.size += 1;
    }

    fn to_file(&self) -> TailFile {
        TailFile {
            format: TAIL_FORMAT.to_owned(),
            size: self.size,
            log_bytes: self.log_bytes,
            last_line_hash: hex::encode(self.last_line_hash),
            frontier: self.frontier.nodes().iter().map(hex::encode).collect(),
            segment_offsets: self.segment_offsets.clone(),
        }
    }

    fn from_file(f: TailFile) -> Option<Self> {
        let hash = |s: &str| hex::decode(s).ok().and_then(|b| <Hash>::try_from(b).ok());
        if f.format != TAIL_FORMAT
            || f.segment_offsets.len() as u64 != f.size.div_ceil(SEGMENT_RECORDS)
        {
            return None;
        }
        let nodes = f
            .frontier
            .iter()
            .map(|s| hash(s))
            .collect::<Option<Vec<Hash>>>()?;
        Some(Tail {
            size: f.size,
            log_bytes: f.log_bytes,
            last_line_hash: hash(&f.last_line_hash)?,
            frontier: Frontier::from_parts(f.size, nodes)?,
            segment_offsets: f.segment_offsets,
        })
    }
}

/// The exclusive (appends) or shared (snapshots) flock on `<dir>/lock`;
/// released when dropped.
pub(crate) struct LogLock {
    _file: File,
}

impl LogLock {
    fn exclusive(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(LogLock { _file: file })
    }

    /// A shared lock if the lock file can be opened; `None` for a read-only
    /// copy of a log (an auditor's), which nobody appends to.
    pub(crate) fn shared(dir: &Path) -> Option<Self> {
        let file = File::open(dir.join(LOCK_FILE)).ok()?;
        file.lock_shared().ok()?;
        Some(LogLock { _file: file })
    }
}

/// Reads newline-terminated lines from the first `limit` bytes of a file.
pub(crate) struct LineReader {
    reader: BufReader<io::Take<File>>,
}

impl LineReader {
    pub(crate) fn open(path: &Path, offset: u64, limit: u64) -> io::Result<Self> {
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok(LineReader {
            reader: BufReader::with_capacity(1 << 16, f.take(limit)),
        })
    }

    /// Reads the next line into `buf` (without its newline). `Some(true)` for
    /// a terminated line, `Some(false)` for trailing bytes with no newline.
    pub(crate) fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
        buf.clear();
        if self.reader.read_until(b'\n', buf)? == 0 {
            return Ok(None);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            Ok(Some(true))
        } else {
            Ok(Some(false))
        }
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::corrupt(path.display().to_string(), reason)
}

impl AuditLog {
    /// Opens (creating, mode 0700) the log directory `dir` (normally
    /// [`audit_dir`] of the state directory). Brings the tail cache up to
    /// date (rebuilding it from `log.jsonl` if it is missing) and checks that
    /// the latest checkpoint is signed by `key`, so a log is never continued
    /// under another key.
    pub fn open(dir: &Path, key: AuditKey, replica: Option<SharedStore>) -> Result<Self> {
        Self::open_with(dir, key, replica, None)
    }

    /// [`AuditLog::open`], naming the replica's root directory when it is a
    /// local store, so that replication removes what killed uploads left.
    pub fn open_with(
        dir: &Path,
        key: AuditKey,
        replica: Option<SharedStore>,
        local_store_root: Option<&Path>,
    ) -> Result<Self> {
        for d in [dir.to_owned(), dir.join(CHECKPOINT_DIR)] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| Error::io(&d, e))?;
        }
        let log = AuditLog {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                key,
                replica,
                local_root: local_store_root.map(Path::to_owned),
                health: Arc::default(),
            }),
        };
        let _lock = LogLock::exclusive(dir)?;
        // The log is a regular file in the audit directory, never what a
        // symlink at its name points to: records appended through one land
        // elsewhere (a copy, /dev/null) while the job they record runs.
        // Appends and truncations also open it with O_NOFOLLOW.
        let log_path = log.log_path();
        match fs::symlink_metadata(&log_path) {
            Ok(m) if !m.file_type().is_file() => {
                return Err(corrupt(
                    &log_path,
                    "is not a regular file (a symlink, directory or device at the log's name): custos \
                     writes its audit log nowhere else; run `custos audit verify`",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&log_path, e)),
        }
        let tail = log.inner.load_tail()?;
        if tail.size > 0 {
            let cp = log.inner.read_checkpoint(tail.size).map_err(|e| match e {
                Error::NotFound { .. } => corrupt(
                    &log.inner.checkpoint_path(tail.size),
                    "the checkpoint of the latest record is missing; run `custos audit verify`",
                ),
                e => e,
            })?;
            if cp.root() != &tail.frontier.root() {
                return Err(corrupt(
                    &log.inner.checkpoint_path(tail.size),
                    "the checkpoint does not match log.jsonl; run `custos audit verify`",
                ));
            }
        }
        Ok(log)
    }

    /// Opens the installation's log: `<state_dir>/audit`, the key of
    /// `[audit] key_file` (or the systemd credential; created on first use).
    pub fn from_config(cfg: &crate::config::Config, replica: Option<SharedStore>) -> Result<Self> {
        let key = AuditKey::load_or_create(&cfg.audit.key_file)?;
        let local_root = match &cfg.store {
            crate::config::StoreLocation::Local(root) => Some(root.as_path()),
            _ => None,
        };
        Self::open_with(&audit_dir(&cfg.state_dir), key, replica, local_root)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn key(&self) -> &AuditKey {
        &self.inner.key
    }

    pub fn log_path(&self) -> PathBuf {
        self.inner.dir.join(LOG_FILE)
    }

    /// The log's failure counts (shared by every clone of this log).
    pub fn health(&self) -> Arc<AuditHealth> {
        self.inner.health.clone()
    }

    /// Appends a record and signs a checkpoint for the new tree size, then
    /// replicates to the store (failures there are logged, not returned).
    ///
    /// `details` must name keys by reference and fingerprint, never carry
    /// key material.
    pub async fn append(
        &self,
        event: &str,
        tenant: Option<&TenantId>,
        actor: &str,
        details: serde_json::Value,
    ) -> Result<Receipt> {
        let (receipt, replication) = self
            .append_deferring_replication(event, tenant, actor, details)
            .await?;
        replication.run().await;
        Ok(receipt)
    }

    /// [`AuditLog::append`] that returns once the record and its checkpoint
    /// are in the local log (written and synced), leaving the copy to the
    /// store to the returned [`Replication`], which the caller runs beside
    /// its own work (four store round trips it need not wait for: a failed
    /// replication is logged either way, and the next append copies what
    /// the store lacks). Until the replication has run or is dropped, it
    /// holds the log's lock: other appends wait for it.
    pub async fn append_deferring_replication(
        &self,
        event: &str,
        tenant: Option<&TenantId>,
        actor: &str,
        details: serde_json::Value,
    ) -> Result<(Receipt, Replication)> {
        if !record::valid_event(event) {
            return Err(Error::InvalidArgument(format!(
                "invalid audit event name {:?} (expected [a-z][a-z0-9._-]{{0,63}})",
                event.chars().take(80).collect::<String>()
            )));
        }
        if !record::valid_actor(actor) {
            return Err(Error::InvalidArgument(
                "an audit actor is 1 to 256 characters without control characters".into(),
            ));
        }
        let inner = self.inner.clone();
        let (event, tenant, actor) = (event.to_owned(), tenant.cloned(), actor.to_owned());
        let (lock, receipt, plan) = blocking(move || {
            let lock = LogLock::exclusive(&inner.dir)?;
            let (receipt, tail) = inner.append_locked(&event, tenant.as_ref(), &actor, details)?;
            let plan = match inner.replica {
                Some(_) => inner.replication_plan(&tail)?,
                None => None,
            };
            Ok((lock, receipt, plan))
        })
        .await
        .inspect_err(|_| self.inner.health.write_failed())?;
        let replication = Replication {
            inner: self.inner.clone(),
            plan,
            _lock: lock,
        };
        Ok((receipt, replication))
    }

    /// Copies to the store whatever it lacks; returns the store's error.
    pub async fn replicate(&self) -> Result<()> {
        if self.inner.replica.is_none() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let (lock, plan) = blocking(move || {
            let lock = LogLock::exclusive(&inner.dir)?;
            let tail = inner.load_tail()?;
            Ok((lock, inner.replication_plan(&tail)?))
        })
        .await?;
        if let Some(plan) = plan {
            self.inner
                .execute(plan)
                .await
                .inspect_err(|_| self.inner.health.replication_failed())?;
        }
        drop(lock);
        Ok(())
    }

    /// Signs (again) a checkpoint for the current tree size, also for an
    /// empty log; returns it.
    pub async fn sign_checkpoint(&self) -> Result<SignedCheckpoint> {
        let inner = self.inner.clone();
        blocking(move || {
            let _lock = LogLock::exclusive(&inner.dir)?;
            let tail = inner.load_tail()?;
            inner.write_checkpoint(&tail)
        })
        .await
    }

    /// The number of records (as of the last completed append).
    pub fn size(&self) -> Result<u64> {
        Ok(self.inner.snapshot_tail()?.size)
    }

    /// The signed checkpoint of tree size `size`, checked against this log's key.
    pub fn checkpoint(&self, size: u64) -> Result<SignedCheckpoint> {
        self.inner.read_checkpoint(size)
    }

    /// The checkpoint of the current size (`None` for an empty log).
    pub fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>> {
        let size = self.size()?;
        if size == 0 {
            return Ok(None);
        }
        self.checkpoint(size).map(Some)
    }

    /// Reads the first `count` lines (O(count): for proofs and `audit show`).
    pub fn read_lines(&self, count: u64) -> Result<Vec<Vec<u8>>> {
        let tail = self.inner.snapshot_tail()?;
        if count > tail.size {
            return Err(Error::InvalidArgument(format!(
                "the audit log has {} records, not {count}",
                tail.size
            )));
        }
        self.inner.read_prefix(count, tail.log_bytes)
    }

    /// Visits records `from..` (as of the last completed append) in order,
    /// one line at a time: memory stays that of one line, however long the
    /// log, and reading starts at the segment holding `from` (the tail
    /// cache's offsets), not at the log's beginning. `visit` gets each
    /// record's seq and line and returns whether to go on. Returns the
    /// number of records in the log.
    pub fn scan_from(&self, from: u64, mut visit: impl FnMut(u64, &[u8]) -> bool) -> Result<u64> {
        let tail = self.inner.snapshot_tail()?;
        if from >= tail.size {
            return Ok(tail.size);
        }
        let segment = from / SEGMENT_RECORDS;
        let path = self.log_path();
        let offset = tail
            .segment_offsets
            .get(segment as usize)
            .copied()
            .ok_or_else(|| corrupt(&path, "tail.json lacks a segment offset"))?;
        let mut reader = LineReader::open(&path, offset, tail.log_bytes - offset)
            .map_err(|e| Error::io(&path, e))?;
        let mut line = Vec::new();
        for seq in segment * SEGMENT_RECORDS..tail.size {
            match reader
                .next_line(&mut line)
                .map_err(|e| Error::io(&path, e))?
            {
                Some(true) => {}
                _ => return Err(corrupt(&path, "log.jsonl ended early")),
            }
            if seq >= from && !visit(seq, &line) {
                break;
            }
        }
        Ok(tail.size)
    }

    /// Record `seq`'s line, read from its segment on (not the whole log).
    pub fn read_line(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        let mut found = None;
        self.scan_from(seq, |_, line| {
            found = Some(line.to_vec());
            false
        })?;
        Ok(found)
    }

    /// The inclusion proof of record `seq` in the tree of the first
    /// `tree_size` records. Reads those records: O(tree_size).
    pub fn inclusion_proof(&self, seq: u64, tree_size: u64) -> Result<InclusionProof> {
        if seq >= tree_size {
            return Err(Error::InvalidArgument(format!(
                "record {seq} is not in a tree of {tree_size} records"
            )));
        }
        let lines = self.read_lines(tree_size)?;
        let leaves: Vec<Hash> = lines.iter().map(|l| record::leaf_hash(l)).collect();
        let hashes = merkle::inclusion_proof(&leaves, seq).expect("seq < tree_size");
        Ok(InclusionProof {
            leaf_index: seq,
            tree_size,
            hashes,
        })
    }

    /// The evidence a deletion certificate embeds for record `seq`: its line,
    /// its inclusion proof and the signed checkpoint of the current size.
    pub fn evidence(&self, seq: u64) -> Result<InclusionEvidence> {
        let size = self.size()?;
        if seq >= size {
            return Err(Error::NotFound {
                what: format!("audit record {seq}"),
            });
        }
        let cp = self.checkpoint(size)?;
        // Leaf hashes only (32 bytes a record), not every line.
        let mut leaves: Vec<Hash> = Vec::with_capacity(size.min(1 << 20) as usize);
        let mut line_of_seq = Vec::new();
        self.scan_from(0, |i, line| {
            if i == seq {
                line_of_seq = line.to_vec();
            }
            leaves.push(record::leaf_hash(line));
            i + 1 < size
        })?;
        let hashes = merkle::inclusion_proof(&leaves, seq).ok_or_else(|| {
            corrupt(
                &self.log_path(),
                format!("record {seq} is not among {} records", leaves.len()),
            )
        })?;
        let proof = InclusionProof {
            leaf_index: seq,
            tree_size: size,
            hashes,
        };
        Ok(InclusionEvidence::new(&line_of_seq, &proof, &cp))
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("audit log task failed: {e}")))?
}

/// Uploads that bring the store copy up to `size`.
struct Plan {
    uploads: Vec<(StorePath, Bytes)>,
    size: u64,
}

impl Inner {
    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn tail_path(&self) -> PathBuf {
        self.dir.join(TAIL_FILE)
    }

    fn checkpoint_path(&self, size: u64) -> PathBuf {
        self.dir.join(CHECKPOINT_DIR).join(size.to_string())
    }

    fn log_len(&self) -> Result<u64> {
        let path = self.log_path();
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn read_tail_file(&self) -> Option<Tail> {
        let bytes = fs::read(self.tail_path()).ok()?;
        let file: TailFile = serde_json::from_slice(&bytes).ok()?;
        Tail::from_file(file)
    }

    /// The cache is replaced atomically but not fsynced: after a power loss
    /// it may be older than the log, which [`Inner::recover`] handles.
    fn write_tail(&self, tail: &Tail) -> Result<()> {
        let path = self.tail_path();
        let json = serde_json::to_vec(&tail.to_file()).expect("serialises");
        replace_file(&path, &json).map_err(|e| Error::io(path, e))
    }

    fn read_checkpoint(&self, size: u64) -> Result<SignedCheckpoint> {
        let path = self.checkpoint_path(size);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    what: format!("audit checkpoint {}", path.display()),
                });
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let cp = SignedCheckpoint::verify(&text, self.key.verifier()).map_err(|e| {
            corrupt(
                &path,
                format!(
                    "{e} (this installation's audit key is {}; was the key replaced?)",
                    self.key.name()
                ),
            )
        })?;
        if cp.size() != size {
            return Err(corrupt(&path, format!("holds tree size {}", cp.size())));
        }
        Ok(cp)
    }

    fn write_checkpoint(&self, tail: &Tail) -> Result<SignedCheckpoint> {
        let cp = self
            .key
            .sign_checkpoint(tail.size, tail.frontier.root())
            .map_err(|e| Error::Internal(format!("signing an audit checkpoint: {e}")))?;
        let path = self.checkpoint_path(tail.size);
        write_file_atomic(&path, cp.text().as_bytes(), 0o644).map_err(|e| Error::io(path, e))?;
        Ok(cp)
    }

    /// A consistent tail for readers, without the lock: the cache as it is
    /// (a longer log is an append in progress). Falls back to the locked,
    /// reconciling [`Inner::load_tail`] when the cache is missing or the log
    /// is shorter than it.
    fn snapshot_tail(&self) -> Result<Tail> {
        if let Some(tail) = self.read_tail_file()
            && self.log_len()? >= tail.log_bytes
        {
            return Ok(tail);
        }
        let _lock = LogLock::exclusive(&self.dir)?;
        self.load_tail()
    }

    /// The tail, reconciled with `log.jsonl` and held to the replication
    /// marker: custos never continues a log shorter than the store copy it
    /// made (that would sign a second history). Callers hold the exclusive lock.
    fn load_tail(&self) -> Result<Tail> {
        let tail = self.reconcile_tail()?;
        let replicated = self.read_replicated().records;
        if replicated > tail.size {
            return Err(corrupt(
                &self.log_path(),
                format!(
                    "log.jsonl holds {} records but {replicated} were copied to the store ({REPLICATED_FILE}): records were removed; run `custos audit verify`",
                    tail.size
                ),
            ));
        }
        Ok(tail)
    }

    fn reconcile_tail(&self) -> Result<Tail> {
        let len = self.log_len()?;
        let Some(tail) = self.read_tail_file() else {
            return self.rebuild_tail(len);
        };
        if len == tail.log_bytes {
            return Ok(tail);
        }
        let path = self.log_path();
        if len < tail.log_bytes {
            return Err(corrupt(
                &path,
                format!(
                    "log.jsonl has {len} bytes but custos wrote {} ({} records): records were removed or truncated; run `custos audit verify`",
                    tail.log_bytes, tail.size
                ),
            ));
        }
        self.recover(tail, len)
    }

    /// The log is longer than the cache says: a torn line (removed: it was
    /// never acknowledged), records whose cache update was lost (kept if they
    /// chain on and their durable checkpoints match), and at most one last
    /// record whose checkpoint a crash prevented (completed). Anything else
    /// is refused.
    fn recover(&self, tail: Tail, len: u64) -> Result<Tail> {
        let path = self.log_path();
        let mut extra = Vec::new();
        LineReader::open(&path, tail.log_bytes, len - tail.log_bytes)
            .and_then(|r| r.reader.into_inner().read_to_end(&mut extra))
            .map_err(|e| Error::io(&path, e))?;
        let refuse = |t: &Tail| {
            corrupt(
                &path,
                format!(
                    "log.jsonl holds data after record {} that custos did not write; run `custos audit verify`",
                    t.size as i128 - 1
                ),
            )
        };
        let mut t = tail;
        let mut rest: &[u8] = &extra;
        let mut unsigned = false;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..i];
            if unsigned {
                return Err(refuse(&t)); // a record without checkpoint, then more
            }
            let chained = AuditRecord::parse_line(line)
                .is_ok_and(|r| r.seq == t.size && r.prev == t.prev_hex());
            if !chained {
                return Err(refuse(&t));
            }
            t.push(line);
            match self.read_checkpoint(t.size) {
                Ok(cp) if cp.root() == &t.frontier.root() => {}
                Ok(_) => return Err(refuse(&t)),
                Err(Error::NotFound { .. }) => unsigned = true,
                Err(e) => return Err(e),
            }
            rest = &rest[i + 1..];
        }
        if !rest.is_empty() {
            tracing::warn!(
                event = "audit.torn_line_removed",
                path = %path.display(),
                bytes = rest.len(),
                "removing an unfinished audit line left by an interrupted append"
            );
            self.truncate_log(t.log_bytes)?;
        }
        if unsigned {
            tracing::warn!(
                event = "audit.append_completed",
                seq = t.size - 1,
                "completing an audit append interrupted before its checkpoint"
            );
            self.write_checkpoint(&t)?;
        }
        self.write_tail(&t)?;
        Ok(t)
    }

    fn truncate_log(&self, len: u64) -> Result<()> {
        let path = self.log_path();
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.set_len(len).map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))
    }

    /// Sizes of the checkpoint files present.
    fn checkpoint_sizes(&self) -> Result<Vec<u64>> {
        list_checkpoint_sizes(&self.dir.join(CHECKPOINT_DIR))
    }

    /// Rebuilds the tail cache from `log.jsonl`, checking the chain and the
    /// latest checkpoint on the way (O(n), only when the cache is missing).
    fn rebuild_tail(&self, len: u64) -> Result<Tail> {
        let path = self.log_path();
        let latest = self.checkpoint_sizes()?.into_iter().max().unwrap_or(0);
        let mut tail = Tail::empty();
        let mut root_at_latest = (latest == 0).then(merkle::empty_root);
        if len > 0 {
            let mut reader = LineReader::open(&path, 0, len).map_err(|e| Error::io(&path, e))?;
            let mut line = Vec::new();
            while let Some(terminated) = reader
                .next_line(&mut line)
                .map_err(|e| Error::io(&path, e))?
            {
                if !terminated {
                    tracing::warn!(
                        event = "audit.torn_line_removed",
                        path = %path.display(),
                        "removing an unfinished audit line left by an interrupted append"
                    );
                    self.truncate_log(tail.log_bytes)?;
                    break;
                }
                let ok = AuditRecord::parse_line(&line)
                    .is_ok_and(|r| r.seq == tail.size && r.prev == tail.prev_hex());
                if !ok {
                    return Err(corrupt(
                        &path,
                        format!(
                            "cannot rebuild the audit tail: record {} is damaged or out of chain; run `custos audit verify`",
                            tail.size
                        ),
                    ));
                }
                tail.push(&line);
                if tail.size == latest {
                    root_at_latest = Some(tail.frontier.root());
                }
            }
        }
        if latest > tail.size {
            return Err(corrupt(
                &path,
                format!(
                    "checkpoint {latest} covers more records than log.jsonl holds ({}): records were removed; run `custos audit verify`",
                    tail.size
                ),
            ));
        }
        if tail.size > latest + 1 {
            return Err(corrupt(
                &path,
                format!(
                    "records {latest}..{} are not covered by a signed checkpoint; run `custos audit verify`",
                    tail.size - 1
                ),
            ));
        }
        if latest > 0 {
            let cp = self.read_checkpoint(latest)?;
            if Some(*cp.root()) != root_at_latest {
                return Err(corrupt(
                    &self.checkpoint_path(latest),
                    "the signed root does not match log.jsonl; run `custos audit verify`",
                ));
            }
        }
        if tail.size == latest + 1 {
            tracing::warn!(
                event = "audit.append_completed",
                seq = latest,
                "completing an audit append interrupted before its checkpoint"
            );
            self.write_checkpoint(&tail)?;
        }
        self.write_tail(&tail)?;
        tracing::info!(
            event = "audit.tail_rebuilt",
            records = tail.size,
            "rebuilt the audit tail cache"
        );
        Ok(tail)
    }

    fn append_locked(
        &self,
        event: &str,
        tenant: Option<&TenantId>,
        actor: &str,
        details: serde_json::Value,
    ) -> Result<(Receipt, Tail)> {
        let mut tail = self.load_tail()?;
        let rec = AuditRecord::new(tail.size, event, tenant, actor, details, tail.prev_hex());
        let line = rec.to_line();
        let path = self.log_path();
        // Signed intent first: a crash after the record but before its
        // checkpoint is then provably custos' own interrupted append.
        let leaf_hash = record::leaf_hash(&line);
        let intent = super::pending::pending_text(tail.size + 1, &leaf_hash);
        let note = self
            .key
            .sign_note(&intent)
            .map_err(|e| Error::Internal(format!("signing an audit append intent: {e}")))?;
        let pending = self.dir.join(PENDING_FILE);
        write_file_atomic(&pending, note.as_bytes(), 0o644).map_err(|e| Error::io(&pending, e))?;
        let mut bytes = line.clone();
        bytes.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if let Err(e) = f.write_all(&bytes).and_then(|()| f.sync_data()) {
            let _ = f.set_len(tail.log_bytes); // best effort; recovery handles the rest
            return Err(Error::io(&path, e));
        }
        if tail.size == 0 {
            sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        }
        tail.push(&line);
        self.write_checkpoint(&tail)?;
        self.write_tail(&tail)?;
        // A stale intent (its size now signed) is ignored by verify.
        let _ = fs::remove_file(&pending);
        let receipt = Receipt {
            seq: rec.seq,
            leaf_hash,
            tree_size: tail.size,
        };
        Ok((receipt, tail))
    }

    fn read_replicated(&self) -> Replicated {
        fs::read(self.dir.join(REPLICATED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The segments and checkpoints the store lacks (by the local marker).
    fn replication_plan(&self, tail: &Tail) -> Result<Option<Plan>> {
        let done = self.read_replicated();
        if done.records >= tail.size && done.checkpoints >= tail.size {
            return Ok(None);
        }
        let mut uploads = Vec::new();
        if done.records < tail.size {
            let path = self.log_path();
            let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let first = done.records.min(tail.size) / SEGMENT_RECORDS;
            let last = (tail.size - 1) / SEGMENT_RECORDS;
            for seg in first..=last {
                let start = tail.segment_offsets[seg as usize];
                let end = tail
                    .segment_offsets
                    .get(seg as usize + 1)
                    .copied()
                    .unwrap_or(tail.log_bytes);
                let mut buf = vec![0u8; (end - start) as usize];
                f.seek(SeekFrom::Start(start))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| Error::io(&path, e))?;
                uploads.push((store_segment_path(seg * SEGMENT_RECORDS), Bytes::from(buf)));
            }
        }
        for size in (done.checkpoints + 1).max(1)..=tail.size {
            let path = self.checkpoint_path(size);
            match fs::read(&path) {
                Ok(text) => uploads.push((store_checkpoint_path(size), Bytes::from(text))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Ok(Some(Plan {
            uploads,
            size: tail.size,
        }))
    }

    /// Uploads a plan (segments before checkpoints) and records the new marker.
    ///
    /// The store copy only ever grows, so that it keeps the evidence when
    /// the local log is cut (or restored from an older copy): nothing is
    /// uploaded while the store holds a checkpoint beyond the local log; a
    /// segment replaces only a prefix of itself; a checkpoint is uploaded
    /// only where there is none or the same one (checkpoints are
    /// deterministic). One HEAD and one GET of the last segment per append.
    async fn execute(self: &Arc<Self>, plan: Plan) -> Result<()> {
        let store = self.replica.clone().expect("only planned with a replica");
        if let Some(root) = self.local_root.clone() {
            let paths: Vec<StorePath> = plan.uploads.iter().map(|(p, _)| p.clone()).collect();
            // Best effort: a leftover costs disk space, not correctness.
            if let Err(e) = blocking(move || sweep_staging(&root, &paths)).await {
                tracing::warn!(event = "audit.staging_sweep_failed", error = %e, "could not remove staging files of an interrupted audit replication");
            }
        }
        let beyond = store_checkpoint_path(plan.size + 1);
        match timed("head", &beyond, store.head(&beyond)).await {
            Ok(_) => {
                return Err(corrupt(
                    &self.log_path(),
                    format!(
                        "the store copy holds {beyond} but the local log has {} records: the local log was cut or replaced; the store copy is not written over (run `custos audit verify`)",
                        plan.size
                    ),
                ));
            }
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        let (segments, checkpoints): (Vec<_>, Vec<_>) = plan
            .uploads
            .into_iter()
            .partition(|(p, _)| p.as_ref().starts_with("audit/log/"));
        futures::stream::iter(segments)
            .map(|(path, bytes)| {
                let store = store.clone();
                async move { put_segment(&store, &path, bytes).await }
            })
            .buffer_unordered(8)
            .try_collect::<()>()
            .await?;
        futures::stream::iter(checkpoints)
            .map(|(path, bytes)| {
                let store = store.clone();
                async move { put_checkpoint(&store, &path, bytes).await }
            })
            .buffer_unordered(8)
            .try_collect::<()>()
            .await?;
        let inner = self.clone();
        let size = plan.size;
        blocking(move || {
            let path = inner.dir.join(REPLICATED_FILE);
            let json = serde_json::to_vec(&Replicated {
                records: size,
                checkpoints: size,
            })
            .expect("serialises");
            replace_file(&path, &json).map_err(|e| Error::io(path, e))
        })
        .await
    }

    fn read_prefix(&self, count: u64, log_bytes: u64) -> Result<Vec<Vec<u8>>> {
        let path = self.log_path();
        let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
        if count == 0 {
            return Ok(out);
        }
        let mut reader = LineReader::open(&path, 0, log_bytes).map_err(|e| Error::io(&path, e))?;
        let mut line = Vec::new();
        while (out.len() as u64) < count {
            match reader
                .next_line(&mut line)
                .map_err(|e| Error::io(&path, e))?
            {
                Some(true) => out.push(line.clone()),
                _ => return Err(corrupt(&path, "log.jsonl ended early")),
            }
        }
        Ok(out)
    }
}

/// What this installation remembers of its log, apart from the log itself:
/// the size and root of its last completed append (`tail.json`) and how
/// many records the store copy is known to hold (`replicated.json`).
/// `audit verify` holds the log to them: a log shorter than either was cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remembered {
    pub tail: Option<(u64, Hash)>,
    pub replicated: Option<u64>,
}

/// Reads [`Remembered`] from an audit directory (missing or unreadable files
/// are `None`: both are caches that an auditor's copy may lack).
pub fn read_remembered(dir: &Path) -> Remembered {
    let tail = fs::read(dir.join(TAIL_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<TailFile>(&b).ok())
        .and_then(Tail::from_file)
        .map(|t| (t.size, t.frontier.root()));
    let replicated = fs::read(dir.join(REPLICATED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Replicated>(&b).ok())
        .map(|r| r.records);
    Remembered { tail, replicated }
}

/// One store request of the replication, bounded by [`STORE_TIMEOUT`].
async fn timed<T>(
    operation: &'static str,
    path: &StorePath,
    request: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(STORE_TIMEOUT, request).await {
        Ok(r) => r.map_err(|e| Error::store(operation, path, e)),
        Err(_) => Err(Error::store(
            operation,
            path,
            object_store::Error::Generic {
                store: "audit replica",
                source: "timed out".into(),
            },
        )),
    }
}

/// Uploads a segment over a prefix of itself (or where there is none): a
/// store segment that holds other or more records is evidence, kept.
async fn put_segment(store: &SharedStore, path: &StorePath, bytes: Bytes) -> Result<()> {
    let there = timed("get", path, async { store.get(path).await?.bytes().await }).await;
    match there {
        Ok(there) if !bytes.starts_with(&there) => {
            return Err(Error::corrupt(
                path.to_string(),
                "the store copy holds records the local log does not: the local log was cut or replaced; the store copy is not written over (run `custos audit verify`)",
            ));
        }
        Ok(there) if there == bytes => return Ok(()),
        Ok(_) => {}
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    let put = store.put(path, PutPayload::from_bytes(bytes));
    timed("put", path, put).await.map(|_| ())
}

/// Uploads a checkpoint where the store has none; one already there must be
/// the same bytes (a replication killed before its marker was written).
async fn put_checkpoint(store: &SharedStore, path: &StorePath, bytes: Bytes) -> Result<()> {
    let opts = object_store::PutOptions {
        mode: object_store::PutMode::Create,
        ..Default::default()
    };
    let put = store.put_opts(path, PutPayload::from_bytes(bytes.clone()), opts);
    match timed("put", path, put).await {
        Ok(_) => Ok(()),
        Err(Error::Store {
            source: object_store::Error::AlreadyExists { .. },
            ..
        }) => {
            let there = timed("get", path, async { store.get(path).await?.bytes().await }).await?;
            if there == bytes {
                Ok(())
            } else {
                Err(Error::corrupt(
                    path.to_string(),
                    "the store copy holds another checkpoint of this size: the local log and the store copy diverged; the store copy is not written over (run `custos audit verify`)",
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes the staging files (`<name>#<digits>`) that a killed upload to a
/// local store leaves beside an audit object, which listings do not show
/// and nothing else removes: every one in `audit/log/` (a few segments), and
/// those of the checkpoints about to be uploaded (the upload a kill cut
/// short is always planned again, as its marker was not written). The
/// caller holds the log's exclusive lock, so no upload of ours is running.
fn sweep_staging(root: &Path, uploads: &[StorePath]) -> Result<()> {
    let remove = |path: &Path| match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(event = "audit.staging_removed", path = %path.display(), "removed a staging file left by an interrupted audit replication");
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    };
    let segments = root.join("audit").join("log");
    match fs::read_dir(&segments) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(&segments, e))?;
                if is_staging_name(&entry.file_name()) {
                    remove(&entry.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&segments, e)),
    }
    for path in uploads
        .iter()
        .filter(|p| !p.as_ref().starts_with("audit/log/"))
    {
        // object_store numbers staging files from 1 and takes the next free one.
        for n in 1..=MAX_STAGING_PROBES {
            let staged = root.join(format!("{}#{n}", path.as_ref()));
            if !remove(&staged)? {
                break;
            }
        }
    }
    Ok(())
}

/// Consecutive staging numbers probed per checkpoint (a kill leaves one;
/// each further kill of the same upload the next number).
const MAX_STAGING_PROBES: u32 = 64;

/// `<name>#<digits>`: how `object_store`'s local store names staged uploads.
fn is_staging_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.rsplit_once('#'))
        .is_some_and(|(base, n)| {
            !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Replaces `path` atomically (temporary file + rename) without fsync: for
/// caches that can be rebuilt.
fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        hex::encode(crate::util::random_bytes::<6>())
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Sizes named by the files of a checkpoint directory (names that are not
/// canonical decimal numbers are skipped).
pub(crate) fn list_checkpoint_sizes(dir: &Path) -> Result<Vec<u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut sizes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u64>().ok().filter(|n| n.to_string() == s))
        {
            sizes.push(n);
        }
    }
    sizes.sort_unstable();
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> AuditKey {
        AuditKey::from_seed(&[3; 32])
    }

    #[tokio::test]
    async fn appends_chain_and_sign_each_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        let t = TenantId::new("acme").unwrap();
        for i in 0..5u64 {
            let r = log
                .append("backup", Some(&t), "test", json!({"n": i}))
                .await
                .unwrap();
            assert_eq!((r.seq, r.tree_size), (i, i + 1));
        }
        let lines = log.read_lines(5).unwrap();
        let recs: Vec<AuditRecord> = lines
            .iter()
            .map(|l| AuditRecord::parse_line(l).unwrap())
            .collect();
        assert_eq!(recs[0].prev, GENESIS_PREV);
        for i in 1..5 {
            assert_eq!(recs[i].prev, hex::encode(record::line_hash(&lines[i - 1])));
        }
        let leaves: Vec<Hash> = lines.iter().map(|l| record::leaf_hash(l)).collect();
        for size in 1..=5u64 {
            let cp = log.checkpoint(size).unwrap();
            assert_eq!(cp.root(), &merkle::root(&leaves[..size as usize]));
        }
        assert!(log.checkpoint(6).is_err());
    }

    #[tokio::test]
    async fn rejects_bad_event_and_actor() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        assert!(log.append("Bad Event", None, "x", json!({})).await.is_err());
        assert!(log.append("ok", None, "", json!({})).await.is_err());
        assert_eq!(log.size().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_torn_line_is_removed_and_one_unsigned_record_completed() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        log.append("a", None, "t", json!({})).await.unwrap();
        let path = log.log_path();
        let good = fs::read(&path).unwrap();

        // Torn: bytes without a newline.
        fs::write(&path, [good.as_slice(), b"{\"seq\":1,\"ti"].concat()).unwrap();
        let r = log.append("b", None, "t", json!({})).await.unwrap();
        assert_eq!(r.seq, 1);

        // A complete next record whose checkpoint and cache update were lost.
        let lines = log.read_lines(2).unwrap();
        let next = AuditRecord::new(
            2,
            "c",
            None,
            "t",
            json!({}),
            hex::encode(record::line_hash(&lines[1])),
        );
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[next.to_line(), b"\n".to_vec()].concat())
            .unwrap();
        drop(f);
        // Readers see the last completed append; the next writer completes it.
        assert_eq!(log.size().unwrap(), 2);
        assert_eq!(log.sign_checkpoint().await.unwrap().size(), 3);
        assert_eq!(log.size().unwrap(), 3);

        // Two unknown lines: refused.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{}\n{}\n").unwrap();
        drop(f);
        let err = log.append("d", None, "t", json!({})).await.unwrap_err();
        assert!(err.to_string().contains("did not write"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_tail_cache_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        log.append("a", None, "t", json!({})).await.unwrap();
        let old_tail = fs::read(dir.path().join(TAIL_FILE)).unwrap();
        for e in ["b", "c", "d"] {
            log.append(e, None, "t", json!({})).await.unwrap();
        }
        // A power loss kept the fsynced lines and checkpoints, not the cache.
        fs::write(dir.path().join(TAIL_FILE), &old_tail).unwrap();
        let r = log.append("e", None, "t", json!({})).await.unwrap();
        assert_eq!(r.seq, 4);
        // ... and also when the last checkpoint is lost too.
        let old_tail = fs::read(dir.path().join(TAIL_FILE)).unwrap();
        log.append("f", None, "t", json!({})).await.unwrap();
        log.append("g", None, "t", json!({})).await.unwrap();
        fs::write(dir.path().join(TAIL_FILE), &old_tail).unwrap();
        fs::remove_file(dir.path().join("checkpoints/7")).unwrap();
        assert_eq!(log.sign_checkpoint().await.unwrap().size(), 7);
        assert!(log.checkpoint(7).is_ok());
        // A missing checkpoint in the middle is not papered over.
        let old_tail = fs::read(dir.path().join(TAIL_FILE)).unwrap();
        log.append("h", None, "t", json!({})).await.unwrap();
        log.append("i", None, "t", json!({})).await.unwrap();
        fs::write(dir.path().join(TAIL_FILE), &old_tail).unwrap();
        fs::remove_file(dir.path().join("checkpoints/8")).unwrap();
        assert!(log.sign_checkpoint().await.is_err());
    }

    #[tokio::test]
    async fn a_shorter_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        log.append("a", None, "t", json!({})).await.unwrap();
        log.append("b", None, "t", json!({})).await.unwrap();
        let path = log.log_path();
        let lines = log.read_lines(2).unwrap();
        fs::write(&path, [lines[0].clone(), b"\n".to_vec()].concat()).unwrap();
        let err = log.append("c", None, "t", json!({})).await.unwrap_err();
        assert!(err.to_string().contains("removed or truncated"), "{err}");
    }

    /// A log shorter than the store copy it made is not continued (that
    /// would sign a second history over the first).
    #[tokio::test]
    async fn a_log_shorter_than_its_replica_is_not_continued() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(object_store::memory::InMemory::new());
        let log = AuditLog::open(dir.path(), key(), Some(store)).unwrap();
        for e in ["a", "b", "c"] {
            log.append(e, None, "t", json!({})).await.unwrap();
        }
        let lines = log.read_lines(3).unwrap();
        fs::write(log.log_path(), [lines[0].clone(), b"\n".to_vec()].concat()).unwrap();
        for s in [2, 3] {
            fs::remove_file(dir.path().join(format!("checkpoints/{s}"))).unwrap();
        }
        fs::remove_file(dir.path().join(TAIL_FILE)).unwrap();
        let err = AuditLog::open(dir.path(), key(), None).unwrap_err();
        assert!(
            err.to_string().contains("were copied to the store"),
            "{err}"
        );
    }

    /// The replica only grows: a segment holding other records, a different
    /// checkpoint of the same size, or a checkpoint beyond the local log are
    /// kept, and the replication fails saying so.
    #[tokio::test]
    async fn replication_never_writes_over_a_longer_or_other_store_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(object_store::memory::InMemory::new());
        let log = AuditLog::open(dir.path(), key(), Some(store.clone())).unwrap();
        for e in ["a", "b"] {
            log.append(e, None, "t", json!({})).await.unwrap();
        }
        let get = async |p: &StorePath| store.get(p).await.unwrap().bytes().await.unwrap();
        let segment = store_segment_path(0);

        // The store is ahead (checkpoint 4 exists): nothing is uploaded.
        let other = AuditKey::from_seed(&[9; 32])
            .sign_checkpoint(4, [1; 32])
            .unwrap();
        store
            .put(
                &store_checkpoint_path(4),
                other.text().as_bytes().to_vec().into(),
            )
            .await
            .unwrap();
        let before = get(&segment).await;
        log.append("c", None, "t", json!({})).await.unwrap();
        assert_eq!(get(&segment).await, before);
        let err = log.replicate().await.unwrap_err();
        assert!(err.to_string().contains("not written over"), "{err}");
        store.delete(&store_checkpoint_path(4)).await.unwrap();

        // A segment with records the local log lacks is kept.
        let longer = [before.to_vec(), b"{\"seq\":9}\n".to_vec()].concat();
        store.put(&segment, longer.clone().into()).await.unwrap();
        assert!(log.replicate().await.is_err());
        assert_eq!(get(&segment).await, longer);
        store.put(&segment, before.clone().into()).await.unwrap();

        // Another checkpoint of a size to upload is kept.
        let forged = AuditKey::from_seed(&[9; 32])
            .sign_checkpoint(3, [1; 32])
            .unwrap();
        store
            .put(
                &store_checkpoint_path(3),
                forged.text().as_bytes().to_vec().into(),
            )
            .await
            .unwrap();
        let err = log.replicate().await.unwrap_err();
        assert!(err.to_string().contains("diverged"), "{err}");
        assert_eq!(
            get(&store_checkpoint_path(3)).await,
            forged.text().as_bytes()
        );

        // With the store copy a prefix of the log again, it catches up.
        store.delete(&store_checkpoint_path(3)).await.unwrap();
        log.replicate().await.unwrap();
        let report = crate::audit::verify_store(&store, key().verifier())
            .await
            .unwrap();
        assert!(report.ok() && report.records == 3, "{report:#?}");
    }

    #[test]
    fn staging_files_are_swept_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let log_dir = root.path().join("audit/log");
        let cp_dir = root.path().join("audit/checkpoints");
        fs::create_dir_all(&log_dir).unwrap();
        fs::create_dir_all(&cp_dir).unwrap();
        let seg = "00000000000000000000.jsonl";
        let cp = "00000000000000000007";
        for f in [
            format!("audit/log/{seg}"),
            format!("audit/log/{seg}#1"),
            format!("audit/log/{seg}#2"),
            format!("audit/log/{seg}#x"),
            format!("audit/checkpoints/{cp}#1"),
            format!("audit/checkpoints/{cp}#2"),
            "audit/checkpoints/00000000000000000003#1".to_owned(),
        ] {
            fs::write(root.path().join(f), b"x").unwrap();
        }
        sweep_staging(
            root.path(),
            &[StorePath::from(format!("audit/checkpoints/{cp}"))],
        )
        .unwrap();
        let mut left: Vec<String> = [&log_dir, &cp_dir]
            .iter()
            .flat_map(|d| fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                seg.to_owned(),
                format!("{seg}#x"), // not a staging name
                // Not being uploaded: a kill leaves only what the next plan uploads again.
                "00000000000000000003#1".to_owned(),
            ]
        );
    }

    #[tokio::test]
    async fn another_key_cannot_continue_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        log.append("a", None, "t", json!({})).await.unwrap();
        let err = AuditLog::open(dir.path(), AuditKey::from_seed(&[4; 32]), None).unwrap_err();
        assert!(err.to_string().contains("was the key replaced"), "{err}");
    }

    #[test]
    fn store_paths_are_zero_padded() {
        assert_eq!(
            store_segment_path(1000).as_ref(),
            "audit/log/00000000000000001000.jsonl"
        );
        assert_eq!(
            store_checkpoint_path(7).as_ref(),
            "audit/checkpoints/00000000000000000007"
        );
    }
}

//! Verification of a whole audit log: chain, tree and signatures.
//!
//! Checks, with the verifier key alone:
//!
//! - every line is a record (known fields only) in canonical form;
//! - sequence numbers run 0, 1, 2, … (a gap is a removed record, a step back
//!   a reordered or duplicated one);
//! - each record's `prev` is the SHA-256 of the line before it; a mismatch
//!   names the earlier record, whose bytes no longer match what its successor
//!   recorded (it was edited);
//! - every checkpoint parses, is signed by the key and names its log, and its
//!   root equals the Merkle root of the first `size` lines (one pass, with a
//!   frontier); the first mismatch names the line(s) added since the last
//!   matching checkpoint, which is one record when every append was signed;
//! - no checkpoint covers more lines than the log holds (records removed at
//!   the end), and the last line is covered by a signed checkpoint (else the
//!   records after it were appended without a signature).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;
use serde::Serialize;

use super::checkpoint::{CheckpointError, SignedCheckpoint};
use super::log::{
    CHECKPOINT_DIR, LOG_FILE, LineReader, LogLock, PENDING_FILE, list_checkpoint_sizes,
};
use super::merkle::{self, Frontier, Hash};
use super::note::{NoteError, VerifierKey};
use super::record::{self, AuditRecord, GENESIS_PREV};
use crate::error::{Error, Result};
use crate::store::SharedStore;

/// What kind of fault verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A line that is not an audit record.
    Malformed,
    /// A record whose line is not its canonical serialisation.
    NotCanonical,
    /// Sequence numbers are missing (records removed).
    Missing,
    /// A record out of its place, or present twice.
    OutOfOrder,
    /// A record's bytes no longer match the `prev` its successor recorded.
    ChainBroken,
    /// The log's last line has no newline.
    Unterminated,
    /// A checkpoint that cannot be parsed.
    CheckpointMalformed,
    /// A checkpoint not (validly) signed by the verifier key.
    BadSignature,
    /// A checkpoint of another log (origin differs from the key name).
    WrongOrigin,
    /// A checkpoint stored under a name that is not its size.
    MisnamedCheckpoint,
    /// Two validly signed checkpoints of one size with different roots.
    Equivocation,
    /// A signed root that differs from the root of the log's records.
    RootMismatch,
    /// A checkpoint covering more records than the log holds.
    Truncated,
    /// Records after the last signed checkpoint.
    Unsigned,
    /// A store object in the wrong place.
    Segment,
}

/// One fault, naming the record (`seq`) and/or checkpoint (tree size) at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditFault {
    pub seq: Option<u64>,
    pub checkpoint: Option<u64>,
    pub kind: FaultKind,
    pub message: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Lines read.
    pub records: u64,
    /// Checkpoints read (valid or not).
    pub checkpoints_checked: u64,
    /// The largest tree size covered by a valid signed checkpoint.
    pub latest_checkpoint: Option<u64>,
    /// The verifier key used.
    pub verifier: String,
    pub faults: Vec<AuditFault>,
    /// The last record, unsigned, was written by custos (its signed intent
    /// is in `pending`) and a crash came before its checkpoint: not a fault;
    /// the next custos command that opens the log signs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted_append: Option<u64>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.faults.is_empty()
    }
}

/// One checkpoint to check: where it came from, the size its name claims
/// (a file `checkpoints/12` claims 12), and its bytes.
#[derive(Debug, Clone)]
pub struct CheckpointInput {
    pub label: String,
    pub named_size: Option<u64>,
    pub text: Vec<u8>,
}

/// Signature and origin faults listed one by one before they are summarised.
const MAX_LISTED_SIGNATURE_FAULTS: usize = 10;
/// Gaps longer than this are reported as a range, not record by record.
const MAX_GAP_SCAN: u64 = 100_000;

/// Verifies a log line by line; see the module docs. Feed lines (without
/// their newline) in order with [`LogVerifier::push`], then [`LogVerifier::finish`].
pub struct LogVerifier {
    verifier: VerifierKey,
    faults: Vec<AuditFault>,
    checkpoints_checked: u64,
    /// Validly signed roots by tree size.
    signed: BTreeMap<u64, Hash>,
    frontier: Frontier,
    prev_line_hash: Hash,
    /// Seq of the previous line if it parsed, for the chain check.
    prev_seq: Option<u64>,
    next_expected: u64,
    seen: HashSet<u64>,
    gaps: Vec<(u64, u64)>,
    /// Size of the last checkpoint whose root matched.
    good: u64,
    /// Seqs of the lines since `good` (None for lines that did not parse).
    since_good: Vec<Option<u64>>,
    first_mismatch: bool,
    later_mismatches: Vec<u64>,
    /// A verified intent to append: (tree size after it, leaf hash).
    pending: Option<(u64, Hash)>,
    last_leaf: Option<Hash>,
}

impl LogVerifier {
    pub fn new(checkpoints: Vec<CheckpointInput>, verifier: &VerifierKey) -> Self {
        let mut v = LogVerifier {
            verifier: verifier.clone(),
            faults: Vec::new(),
            checkpoints_checked: 0,
            signed: BTreeMap::new(),
            frontier: Frontier::new(),
            prev_line_hash: [0; 32],
            prev_seq: None,
            next_expected: 0,
            seen: HashSet::new(),
            gaps: Vec::new(),
            good: 0,
            since_good: Vec::new(),
            first_mismatch: true,
            later_mismatches: Vec::new(),
            pending: None,
            last_leaf: None,
        };
        v.check_checkpoints(checkpoints);
        if v.signed.get(&0).is_some_and(|r| *r != merkle::empty_root()) {
            v.fault(
                None,
                Some(0),
                FaultKind::RootMismatch,
                "checkpoint 0: the root of the empty tree is SHA-256 of nothing".into(),
            );
        }
        v
    }

    fn fault(
        &mut self,
        seq: Option<u64>,
        checkpoint: Option<u64>,
        kind: FaultKind,
        message: String,
    ) {
        self.faults.push(AuditFault {
            seq,
            checkpoint,
            kind,
            message,
        });
    }

    fn check_checkpoints(&mut self, mut inputs: Vec<CheckpointInput>) {
        inputs.sort_by_key(|c| c.named_size);
        let mut signature_faults = 0usize;
        let mut unlisted = Vec::new();
        for c in inputs {
            self.checkpoints_checked += 1;
            let claimed = SignedCheckpoint::parse_unverified(&c.text)
                .ok()
                .map(|cp| cp.size())
                .or(c.named_size);
            let cp = match SignedCheckpoint::verify(&c.text, &self.verifier) {
                Ok(cp) => cp,
                Err(CheckpointError::Note(
                    e @ (NoteError::NotSigned(_) | NoteError::BadSignature(_)),
                )) => {
                    signature_faults += 1;
                    if signature_faults <= MAX_LISTED_SIGNATURE_FAULTS {
                        let why = match e {
                            NoteError::NotSigned(_) => "carries no signature by the verifier key",
                            _ => "has a signature by the verifier key that does not verify",
                        };
                        self.fault(
                            None,
                            claimed,
                            FaultKind::BadSignature,
                            format!("checkpoint {}: {why}", c.label),
                        );
                    } else {
                        unlisted.push(c.label);
                    }
                    continue;
                }
                Err(CheckpointError::WrongOrigin { expected, found }) => {
                    signature_faults += 1;
                    if signature_faults <= MAX_LISTED_SIGNATURE_FAULTS {
                        self.fault(
                            None,
                            claimed,
                            FaultKind::WrongOrigin,
                            format!(
                                "checkpoint {}: it is for log {found:?}, not {expected:?}",
                                c.label
                            ),
                        );
                    } else {
                        unlisted.push(c.label);
                    }
                    continue;
                }
                Err(e) => {
                    self.fault(
                        None,
                        claimed,
                        FaultKind::CheckpointMalformed,
                        format!("checkpoint {}: {e}", c.label),
                    );
                    continue;
                }
            };
            let size = cp.size();
            if let Some(named) = c.named_size.filter(|&n| n != size) {
                self.fault(
                    None,
                    Some(size),
                    FaultKind::MisnamedCheckpoint,
                    format!(
                        "checkpoint {}: named for tree size {named} but signs size {size}",
                        c.label
                    ),
                );
            }
            match self.signed.get(&size) {
                Some(root) if root != cp.root() => self.fault(
                    None,
                    Some(size),
                    FaultKind::Equivocation,
                    format!(
                        "checkpoint {}: a second signed checkpoint of size {size} with another root",
                        c.label
                    ),
                ),
                _ => {
                    self.signed.insert(size, *cp.root());
                }
            }
        }
        if !unlisted.is_empty() {
            self.fault(
                None,
                None,
                FaultKind::BadSignature,
                format!(
                    "{} more checkpoints are not validly signed for this log by the verifier key ({} … {})",
                    unlisted.len(),
                    unlisted[0],
                    unlisted[unlisted.len() - 1]
                ),
            );
        }
        if signature_faults > 0 && self.signed.is_empty() {
            self.fault(
                None,
                None,
                FaultKind::BadSignature,
                format!(
                    "no checkpoint is validly signed by {}: is it the right public key?",
                    self.verifier
                ),
            );
        }
    }

    /// Checks the next line (without its newline).
    pub fn push(&mut self, line: &[u8]) {
        let position = self.frontier.size();
        let leaf = record::leaf_hash(line);
        self.frontier.push(leaf);
        self.last_leaf = Some(leaf);
        let line_hash = record::line_hash(line);
        let parsed = AuditRecord::from_line(line);
        let seq = parsed.as_ref().ok().map(|r| r.seq);
        match parsed {
            Err(e) => {
                self.fault(
                    Some(self.next_expected),
                    None,
                    FaultKind::Malformed,
                    format!(
                        "line {} (where record {} belongs): {e}",
                        position + 1,
                        self.next_expected
                    ),
                );
                self.next_expected += 1;
            }
            Ok(rec) => self.check_record(&rec, line, position),
        }
        self.prev_line_hash = line_hash;
        self.prev_seq = seq;
        self.since_good.push(seq);
        self.check_root();
    }

    fn check_record(&mut self, rec: &AuditRecord, line: &[u8], position: u64) {
        let seq = rec.seq;
        if !rec.is_canonical(line) {
            self.fault(
                Some(seq),
                None,
                FaultKind::NotCanonical,
                format!(
                    "record {seq} (line {}): not in canonical form; its bytes were edited",
                    position + 1
                ),
            );
        }
        let expected = self.next_expected;
        if seq != expected {
            if self.seen.contains(&seq) {
                self.fault(
                    Some(seq),
                    None,
                    FaultKind::OutOfOrder,
                    format!("record {seq} appears again at line {}", position + 1),
                );
            } else if seq > expected {
                self.gaps.push((expected, seq - 1));
            } else {
                let after = match self.prev_seq {
                    Some(p) => format!("after record {p}"),
                    None => format!("at line {}", position + 1),
                };
                self.fault(
                    Some(seq),
                    None,
                    FaultKind::OutOfOrder,
                    format!("record {seq} is out of order: it comes {after} (records reordered)"),
                );
            }
        }
        self.seen.insert(seq);
        self.next_expected = seq.saturating_add(1);

        // The chain: only across neighbours whose order is right.
        if seq == 0 && position == 0 {
            if rec.prev != GENESIS_PREV {
                self.fault(
                    Some(0),
                    None,
                    FaultKind::ChainBroken,
                    "record 0: prev must be 64 zeros".into(),
                );
            }
        } else if position > 0 && self.prev_seq.is_some_and(|p| p.checked_add(1) == Some(seq)) {
            let p = seq - 1;
            if rec.prev != hex::encode(self.prev_line_hash) {
                self.fault(
                    Some(p),
                    None,
                    FaultKind::ChainBroken,
                    format!(
                        "record {p} was changed after record {seq} was written: its hash no longer matches the prev recorded by record {seq}"
                    ),
                );
            }
        }
    }

    fn check_root(&mut self) {
        let size = self.frontier.size();
        let Some(signed) = self.signed.get(&size).copied() else {
            return;
        };
        if signed == self.frontier.root() {
            self.good = size;
            self.since_good.clear();
            return;
        }
        if !self.first_mismatch {
            self.later_mismatches.push(size);
            return;
        }
        self.first_mismatch = false;
        let first_line = self.good + 1;
        let names = |s: &Option<u64>| match s {
            Some(q) => format!("record {q}"),
            None => "an unparseable line".to_owned(),
        };
        let (seq, message) = if size - self.good == 1 {
            let s = self.since_good[0];
            (
                s.or(Some(self.good)),
                format!(
                    "checkpoint {size}: the signed root does not match the log; line {first_line} ({}) is not what was signed",
                    names(&s)
                ),
            )
        } else {
            let s = self.since_good.first().copied().flatten();
            (
                s.or(Some(self.good)),
                format!(
                    "checkpoint {size}: the signed root does not match the log; one of lines {first_line}..{size} ({} …) is not what was signed",
                    names(&self.since_good[0])
                ),
            )
        };
        self.fault(seq, Some(size), FaultKind::RootMismatch, message);
    }

    /// Ends the verification.
    pub fn finish(mut self) -> VerifyReport {
        let n = self.frontier.size();
        for (a, b) in std::mem::take(&mut self.gaps) {
            if b - a >= MAX_GAP_SCAN {
                self.fault(
                    Some(a),
                    None,
                    FaultKind::Missing,
                    format!("records {a}..{b} are missing (removed)"),
                );
                continue;
            }
            let mut run: Option<(u64, u64)> = None;
            let mut runs = Vec::new();
            for s in a..=b {
                if self.seen.contains(&s) {
                    runs.extend(run.take());
                } else {
                    run = Some(run.map_or((s, s), |(x, _)| (x, s)));
                }
            }
            runs.extend(run);
            for (x, y) in runs {
                let message = if x == y {
                    format!("record {x} is missing (removed)")
                } else {
                    format!("records {x}..{y} are missing (removed)")
                };
                self.fault(Some(x), None, FaultKind::Missing, message);
            }
        }
        if !self.later_mismatches.is_empty() {
            let (a, b) = (
                self.later_mismatches[0],
                self.later_mismatches[self.later_mismatches.len() - 1],
            );
            self.fault(
                None,
                Some(a),
                FaultKind::RootMismatch,
                format!(
                    "{} later checkpoints (sizes {a}..{b}) do not match the log either",
                    self.later_mismatches.len()
                ),
            );
        }
        if let Some((&beyond, _)) = self.signed.range(n + 1..).next_back() {
            self.fault(
                Some(n),
                Some(beyond),
                FaultKind::Truncated,
                format!(
                    "checkpoint {beyond} covers {beyond} records but the log holds {n}: records {n}..{} were removed",
                    beyond - 1
                ),
            );
        }
        let latest = self.signed.range(..=n).next_back().map(|(&s, _)| s);
        let covered = latest.unwrap_or(0);
        let mut interrupted_append = None;
        if n == covered + 1
            && self.faults.is_empty()
            && self
                .pending
                .is_some_and(|(size, leaf)| size == n && self.last_leaf == Some(leaf))
        {
            interrupted_append = Some(covered);
        } else if n > covered {
            let message = if n - covered == 1 {
                format!(
                    "record {covered} comes after the last signed checkpoint ({covered}): appended without signature"
                )
            } else {
                format!(
                    "records {covered}..{} come after the last signed checkpoint ({covered}): appended without signature",
                    n - 1
                )
            };
            self.fault(Some(covered), latest, FaultKind::Unsigned, message);
        }
        VerifyReport {
            records: n,
            checkpoints_checked: self.checkpoints_checked,
            latest_checkpoint: self.signed.keys().next_back().copied(),
            verifier: self.verifier.to_string(),
            faults: self.faults,
            interrupted_append,
        }
    }
}

/// Verifies lines (without newlines) and checkpoints with `verifier`.
pub fn verify_log<I, L>(
    lines: I,
    checkpoints: Vec<CheckpointInput>,
    verifier: &VerifierKey,
) -> VerifyReport
where
    I: IntoIterator<Item = L>,
    L: AsRef<[u8]>,
{
    let mut v = LogVerifier::new(checkpoints, verifier);
    for line in lines {
        v.push(line.as_ref());
    }
    v.finish()
}

/// Verifies the log in a directory (`log.jsonl`, `checkpoints/`): this
/// installation's, or a copy handed to an auditor. Appends that start while
/// it runs are not seen: the log and checkpoint list are snapshotted first
/// (under a shared lock, when the directory has a lock file).
pub fn verify_dir(dir: &Path, verifier: &VerifierKey) -> Result<VerifyReport> {
    let log_path = dir.join(LOG_FILE);
    let cp_dir = dir.join(CHECKPOINT_DIR);
    let (len, sizes) = {
        let _lock = LogLock::shared(dir);
        let len = match std::fs::metadata(&log_path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io(&log_path, e)),
        };
        (len, list_checkpoint_sizes(&cp_dir)?)
    };
    let mut checkpoints = Vec::with_capacity(sizes.len());
    for size in sizes {
        let path = cp_dir.join(size.to_string());
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        checkpoints.push(CheckpointInput {
            label: format!("{CHECKPOINT_DIR}/{size}"),
            named_size: Some(size),
            text,
        });
    }
    let mut v = LogVerifier::new(checkpoints, verifier);
    v.pending = match std::fs::read(dir.join(PENDING_FILE)) {
        Ok(text) => parse_pending(&text, verifier),
        Err(_) => None,
    };
    if len > 0 {
        let mut reader =
            LineReader::open(&log_path, 0, len).map_err(|e| Error::io(&log_path, e))?;
        let mut line = Vec::new();
        while let Some(terminated) = reader
            .next_line(&mut line)
            .map_err(|e| Error::io(&log_path, e))?
        {
            if !terminated {
                let at = v.frontier.size();
                v.fault(
                    Some(at),
                    None,
                    FaultKind::Unterminated,
                    format!(
                        "line {} (record {at}) has no newline: torn or edited",
                        at + 1
                    ),
                );
            }
            v.push(&line);
        }
    }
    Ok(v.finish())
}

/// Verifies the copy replicated to the store: `audit/log/` segments in name
/// order and every `audit/checkpoints/` object.
pub async fn verify_store(store: &SharedStore, verifier: &VerifierKey) -> Result<VerifyReport> {
    let list = |prefix: &'static str| async move {
        let mut metas: Vec<StorePath> = store
            .list(Some(&StorePath::from(prefix)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| Error::store("list", prefix, e))?;
        metas.sort();
        Ok::<_, Error>(metas)
    };
    let get = |path: StorePath| {
        let store = store.clone();
        async move {
            let bytes = async { store.get(&path).await?.bytes().await }
                .await
                .map_err(|e| Error::store("get", &path, e))?;
            Ok::<_, Error>((path, bytes))
        }
    };

    let cp_paths = list("audit/checkpoints").await?;
    let fetched: Vec<(StorePath, bytes::Bytes)> = futures::stream::iter(cp_paths)
        .map(get)
        .buffered(16)
        .try_collect()
        .await?;
    let checkpoints = fetched
        .into_iter()
        .map(|(path, text)| {
            let name = path.filename().unwrap_or_default();
            CheckpointInput {
                label: path.to_string(),
                named_size: name.parse::<u64>().ok(),
                text: text.to_vec(),
            }
        })
        .collect();
    let mut v = LogVerifier::new(checkpoints, verifier);

    for path in list("audit/log").await? {
        let (_, bytes) = get(path.clone()).await?;
        let first = path
            .filename()
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok());
        let at = v.frontier.size();
        if first != Some(at) {
            v.fault(
                Some(at),
                None,
                FaultKind::Segment,
                format!(
                    "segment {path} holds line {} (record {at} expected first)",
                    at + 1
                ),
            );
        }
        let mut rest: &[u8] = &bytes;
        while !rest.is_empty() {
            let (line, next, terminated) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..], true),
                None => (rest, &rest[rest.len()..], false),
            };
            if !terminated {
                let at = v.frontier.size();
                v.fault(
                    Some(at),
                    None,
                    FaultKind::Unterminated,
                    format!("segment {path}: its last line (record {at}) has no newline"),
                );
            }
            v.push(line);
            rest = next;
        }
    }
    Ok(v.finish())
}

/// The signed intent custos writes (to `pending`) before it appends a
/// record: `custos audit append`, the tree size after the append, and the
/// record's leaf hash, signed with the audit key. It tells a crash between a
/// record and its checkpoint apart from a record appended by someone without
/// the key.
pub(crate) fn pending_text(size: u64, leaf: &Hash) -> String {
    use base64::Engine;
    format!(
        "{PENDING_ORIGIN}\n{size}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(leaf)
    )
}

const PENDING_ORIGIN: &str = "custos audit append";

/// A pending intent that verifies with `verifier`: (size, leaf hash).
pub(crate) fn parse_pending(text: &[u8], verifier: &VerifierKey) -> Option<(u64, Hash)> {
    use base64::Engine;
    let note = super::note::SignedNote::parse(text).ok()?;
    note.verify(verifier).ok()?;
    let mut lines = note.text().lines();
    if lines.next()? != PENDING_ORIGIN {
        return None;
    }
    let size = lines.next()?.parse().ok()?;
    let leaf = base64::engine::general_purpose::STANDARD
        .decode(lines.next()?)
        .ok()?
        .try_into()
        .ok()?;
    lines.next().is_none().then_some((size, leaf))
}

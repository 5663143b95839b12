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
//!
//! A cut that takes the checkpoints with the records leaves a shorter log
//! that is valid on its own. So each copy is also held to what everything
//! else knows of the log ([`Knowledge`]): the state's last completed append
//! (`tail.json`) and how far the store copy reached (`replicated.json`), the
//! other copy's latest signed checkpoint, and checkpoints an operator kept
//! elsewhere (witnesses). A copy shorter than what a source that got its
//! records from it knows was cut; a signed root that differs from the
//! copy's records of that size means the copies diverged. See
//! [`verify_local_copy`] and [`verify_store_copy`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;
use serde::Serialize;

use super::checkpoint::{CheckpointError, SignedCheckpoint};
use super::log::{
    CHECKPOINT_DIR, LOG_FILE, LineReader, LogLock, REPLICATED_FILE, Remembered, TAIL_FILE,
    list_checkpoint_sizes, read_remembered,
};
use super::merkle::{self, Frontier, Hash};
use super::note::{NoteError, VerifierKey};
use super::pending::{PENDING_FILE, parse_pending};
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
    /// Records removed from the end of a copy, with their checkpoints: the
    /// other copy, the state or a witness still knows them.
    Cut,
    /// Another copy, the state or a witness knows a different root for the
    /// first records than this copy holds.
    Diverged,
    /// The other copy could not be read, so the copies could not be compared.
    CrossCheckUnavailable,
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
    /// Each copy held to what the others (and the state, and witnesses) know.
    pub cross_checks: Vec<CrossCheck>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.faults.is_empty()
    }

    /// One line for an error message: how many faults, and the first.
    pub fn summary(&self) -> String {
        match self.faults.first() {
            None => "no faults".to_owned(),
            Some(f) if self.faults.len() == 1 => format!("1 fault: {}", f.message),
            Some(f) => format!("{} faults, the first: {}", self.faults.len(), f.message),
        }
    }
}

/// What a source other than the copy being verified knows of the log.
#[derive(Debug, Clone)]
pub struct Knowledge {
    /// Where it comes from: `state tail.json`, `store copy (signed checkpoint 12)`, …
    pub source: String,
    /// The log held at least this many records.
    pub records: u64,
    /// Their Merkle root, when the source has it (a signed checkpoint, the
    /// state's last append).
    pub root: Option<Hash>,
    /// Whether the copy verified must hold them: true when the source got
    /// them from that copy (the local log feeds the state and the store copy,
    /// so it must hold whatever they know). A replica legitimately lags the
    /// log it copies, so the local log's length does not bind the store copy.
    pub binding: bool,
}

/// How a copy compares with one source of [`Knowledge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossOutcome {
    /// The copy holds all the source knows, with the same root.
    Consistent,
    /// A replica that has not caught up yet (not a fault).
    Behind,
    /// The copy lacks records the source knows it had.
    Cut,
    /// The source knows another root for the copy's first records.
    Diverged,
    /// The source could not be read (or was skipped with `--offline`).
    Unavailable,
}

/// One comparison of a copy with a source of knowledge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrossCheck {
    /// `local log` or `store copy`.
    pub copy: String,
    /// What it was compared with.
    pub against: String,
    /// Records the copy holds (`None`: not read).
    pub copy_records: Option<u64>,
    /// Records the source knows of (`None`: not read).
    pub known_records: Option<u64>,
    pub outcome: CrossOutcome,
    pub message: String,
}

/// The local copy's name in reports.
pub const LOCAL_COPY: &str = "local log";
/// The store copy's name in reports.
pub const STORE_COPY: &str = "store copy";

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
    /// Which copy this is (`local log`, `store copy`), for cross-check messages.
    copy: String,
    knowledge: Vec<Knowledge>,
    /// Indexes into `knowledge` with a root, by the size to check it at.
    roots_at: BTreeMap<u64, Vec<usize>>,
    /// Indexes into `knowledge` whose root did not match.
    diverged: HashSet<usize>,
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
            copy: "log".to_owned(),
            knowledge: Vec::new(),
            roots_at: BTreeMap::new(),
            diverged: HashSet::new(),
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

    /// Names the copy verified (`local log`, `store copy`) in cross-checks.
    pub fn copy_name(mut self, copy: &str) -> Self {
        self.copy = copy.to_owned();
        self
    }

    /// Holds the copy to what `k` knows of the log; call before the first
    /// [`LogVerifier::push`] (roots are compared as the lines go by).
    pub fn expect(&mut self, k: Knowledge) {
        let i = self.knowledge.len();
        if let Some(root) = k.root {
            if k.records == 0 {
                if root != merkle::empty_root() {
                    self.diverged.insert(i);
                }
            } else if k.records > self.frontier.size() {
                self.roots_at.entry(k.records).or_default().push(i);
            }
        }
        self.knowledge.push(k);
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
        if let Some(ids) = self.roots_at.remove(&self.frontier.size()) {
            let root = self.frontier.root();
            for i in ids {
                if self.knowledge[i].root != Some(root) {
                    self.diverged.insert(i);
                }
            }
        }
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
        let knowledge = std::mem::take(&mut self.knowledge);
        let diverged = std::mem::take(&mut self.diverged);
        let (cross_checks, faults) =
            hold_to_knowledge(&self.copy, n, &knowledge, |i| diverged.contains(&i));
        self.faults.extend(faults);
        VerifyReport {
            records: n,
            checkpoints_checked: self.checkpoints_checked,
            latest_checkpoint: self.signed.keys().next_back().copied(),
            verifier: self.verifier.to_string(),
            faults: self.faults,
            interrupted_append,
            cross_checks,
        }
    }
}

/// Compares a copy of `records` records with each source of knowledge:
/// cross-checks for the report, and the faults they show (one `cut` fault
/// per copy, naming the source that knows the most, and one `diverged`
/// fault per source whose root differs). `diverged(i)` says whether the
/// root of `knowledge[i]` was found to differ.
pub fn hold_to_knowledge(
    copy: &str,
    records: u64,
    knowledge: &[Knowledge],
    diverged: impl Fn(usize) -> bool,
) -> (Vec<CrossCheck>, Vec<AuditFault>) {
    let mut checks = Vec::new();
    let mut faults = Vec::new();
    let mut cut_by: Vec<&Knowledge> = Vec::new();
    for (i, k) in knowledge.iter().enumerate() {
        let (outcome, message) = if k.records > records && k.binding {
            cut_by.push(k);
            (
                CrossOutcome::Cut,
                format!(
                    "the {copy} was cut: {} knows {} records, the {copy} holds {records}",
                    k.source, k.records
                ),
            )
        } else if k.records > records {
            (
                CrossOutcome::Behind,
                format!(
                    "the {copy} holds {records} records, {} knows {}: not yet copied",
                    k.source, k.records
                ),
            )
        } else if diverged(i) {
            let message = format!(
                "the {copy} diverged from {}: its first {} records are not the ones {} knows (a record was rewritten in one of them)",
                k.source, k.records, k.source
            );
            faults.push(AuditFault {
                seq: None,
                checkpoint: Some(k.records),
                kind: FaultKind::Diverged,
                message: message.clone(),
            });
            (CrossOutcome::Diverged, message)
        } else {
            let what = if k.root.is_some() {
                "holds them with the same root"
            } else {
                "holds them"
            };
            (
                CrossOutcome::Consistent,
                format!(
                    "{} knows {} records; the {copy} {what}",
                    k.source, k.records
                ),
            )
        };
        checks.push(CrossCheck {
            copy: copy.to_owned(),
            against: k.source.clone(),
            copy_records: Some(records),
            known_records: Some(k.records),
            outcome,
            message,
        });
    }
    // One fault per cut copy, up to the most any source knows, naming every
    // source that knows of removed records.
    if let Some(most) = cut_by.iter().map(|k| k.records).max() {
        let last = most - 1;
        let removed = if last == records {
            format!("record {records} was removed")
        } else {
            format!("records {records}..{last} were removed")
        };
        let known: Vec<String> = cut_by
            .iter()
            .map(|k| format!("{} knows {}", k.source, k.records))
            .collect();
        faults.push(AuditFault {
            seq: Some(records),
            checkpoint: cut_by
                .iter()
                .filter(|k| k.root.is_some())
                .map(|k| k.records)
                .max(),
            kind: FaultKind::Cut,
            message: format!(
                "the {copy} was cut: it holds {records} records, but {}: {removed} from its end",
                known.join(", ")
            ),
        });
    }
    (checks, faults)
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
/// (under a shared lock, when the directory has a lock file). The log is
/// held to what the directory's state remembers (`tail.json`,
/// `replicated.json`), when it has them.
pub fn verify_dir(dir: &Path, verifier: &VerifierKey) -> Result<VerifyReport> {
    verify_dir_with(dir, verifier, Vec::new())
}

/// The `state …` knowledge of a directory's remembered state: the log held
/// at least what its last completed append and its replication reached.
fn remembered_knowledge(r: Remembered, binding: bool) -> Vec<Knowledge> {
    let mut out = Vec::new();
    if let Some((size, root)) = r.tail {
        out.push(Knowledge {
            source: format!("the state's last append ({TAIL_FILE})"),
            records: size,
            root: Some(root),
            binding,
        });
    }
    if let Some(records) = r.replicated {
        out.push(Knowledge {
            source: format!("the state's replication marker ({REPLICATED_FILE})"),
            records,
            root: None,
            binding: true,
        });
    }
    out
}

/// [`verify_dir`], also holding the log to `knowledge` from elsewhere (the
/// store copy, witnesses).
pub fn verify_dir_with(
    dir: &Path,
    verifier: &VerifierKey,
    knowledge: Vec<Knowledge>,
) -> Result<VerifyReport> {
    let log_path = dir.join(LOG_FILE);
    let cp_dir = dir.join(CHECKPOINT_DIR);
    let (len, sizes, remembered) = {
        let _lock = LogLock::shared(dir);
        let len = match std::fs::metadata(&log_path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io(&log_path, e)),
        };
        // Read under the same lock as the length: no append in between.
        (len, list_checkpoint_sizes(&cp_dir)?, read_remembered(dir))
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
    let mut v = LogVerifier::new(checkpoints, verifier).copy_name(LOCAL_COPY);
    for k in remembered_knowledge(remembered, true)
        .into_iter()
        .chain(knowledge)
    {
        v.expect(k);
    }
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
    verify_store_with(store, verifier, Vec::new()).await
}

/// [`verify_store`], also holding the store copy to `knowledge` (the local
/// state's replication marker, the local log, witnesses).
pub async fn verify_store_with(
    store: &SharedStore,
    verifier: &VerifierKey,
    knowledge: Vec<Knowledge>,
) -> Result<VerifyReport> {
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
    let mut v = LogVerifier::new(checkpoints, verifier).copy_name(STORE_COPY);
    for k in knowledge {
        v.expect(k);
    }

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

/// How far a copy reaches, read without verifying it in full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extent {
    /// Complete records it holds.
    pub records: u64,
    /// Its largest checkpoint validly signed by the verifier key: (size, root).
    pub signed: Option<(u64, Hash)>,
}

impl Extent {
    /// What the copy can show: its records, as far as they are signed.
    pub fn proven(&self) -> u64 {
        self.records.min(self.signed.map_or(0, |(s, _)| s))
    }
}

/// Checkpoints tried, from the largest down, when looking for the latest
/// validly signed one (the rest is for a full verification to report).
const MAX_EXTENT_TRIES: usize = 16;

/// The store copy's extent: the records of its segments (the last segment's
/// first record plus its complete lines) and its latest validly signed
/// checkpoint. Two listings and a few reads.
pub async fn store_extent(store: &SharedStore, verifier: &VerifierKey) -> Result<Extent> {
    let names = |prefix: &'static str| async move {
        store
            .list(Some(&StorePath::from(prefix)))
            .map_ok(|m| m.location)
            .try_collect::<Vec<StorePath>>()
            .await
            .map_err(|e| Error::store("list", prefix, e))
    };
    let get = |path: StorePath| async move {
        match store.get(&path).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| Error::store("get", &path, e)),
            // Listed, then gone: not this copy's latest.
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store("get", &path, e)),
        }
    };
    let mut sized: Vec<(u64, StorePath)> = names("audit/checkpoints")
        .await?
        .into_iter()
        .filter_map(|p| Some((p.filename()?.parse::<u64>().ok()?, p)))
        .collect();
    sized.sort_unstable_by_key(|(size, _)| std::cmp::Reverse(*size));
    let mut signed = None;
    for (size, path) in sized.into_iter().take(MAX_EXTENT_TRIES) {
        if let Some(text) = get(path).await?
            && let Ok(cp) = SignedCheckpoint::verify(&text, verifier)
            && cp.size() == size
        {
            signed = Some((size, *cp.root()));
            break;
        }
    }
    let last_segment = names("audit/log")
        .await?
        .into_iter()
        .filter_map(|p| {
            let first = p.filename()?.strip_suffix(".jsonl")?.parse::<u64>().ok()?;
            Some((first, p))
        })
        .max_by_key(|(first, _)| *first);
    let records = match last_segment {
        None => 0,
        Some((first, path)) => match get(path).await? {
            Some(bytes) => first + bytes.iter().filter(|&&b| b == b'\n').count() as u64,
            None => 0,
        },
    };
    Ok(Extent { records, signed })
}

/// The local copy's extent and remembered state, read under the shared
/// lock; `None` when the directory holds no log at all (an auditor's machine).
pub fn local_extent(dir: &Path, verifier: &VerifierKey) -> Result<Option<(Extent, Remembered)>> {
    let log_path = dir.join(LOG_FILE);
    let cp_dir = dir.join(CHECKPOINT_DIR);
    let (len, sizes, remembered) = {
        let _lock = LogLock::shared(dir);
        let len = match std::fs::metadata(&log_path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&log_path, e)),
        };
        (len, list_checkpoint_sizes(&cp_dir)?, read_remembered(dir))
    };
    if len.is_none() && sizes.is_empty() && remembered == Remembered::default() {
        return Ok(None);
    }
    let mut records = 0;
    if let Some(len) = len.filter(|&l| l > 0) {
        let mut reader =
            LineReader::open(&log_path, 0, len).map_err(|e| Error::io(&log_path, e))?;
        let mut line = Vec::new();
        while let Some(true) = reader
            .next_line(&mut line)
            .map_err(|e| Error::io(&log_path, e))?
        {
            records += 1;
        }
    }
    let mut signed = None;
    for size in sizes.into_iter().rev().take(MAX_EXTENT_TRIES) {
        let path = cp_dir.join(size.to_string());
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        if let Ok(cp) = SignedCheckpoint::verify(&text, verifier)
            && cp.size() == size
        {
            signed = Some((size, *cp.root()));
            break;
        }
    }
    Ok(Some((Extent { records, signed }, remembered)))
}

/// A checkpoint kept outside custos (`audit verify --witness FILE`): its label and bytes.
#[derive(Debug, Clone)]
pub struct Witness {
    pub label: String,
    pub text: Vec<u8>,
}

/// Knowledge from witnesses (binding for the local log, which they were
/// taken from), and a fault for each witness that is not a checkpoint
/// validly signed by the verifier key.
fn witness_knowledge(
    witnesses: &[Witness],
    verifier: &VerifierKey,
    binding: bool,
) -> (Vec<Knowledge>, Vec<AuditFault>) {
    let mut knowledge = Vec::new();
    let mut faults = Vec::new();
    for w in witnesses {
        match SignedCheckpoint::verify(&w.text, verifier) {
            Ok(cp) => knowledge.push(Knowledge {
                source: format!("witness {} (signed checkpoint {})", w.label, cp.size()),
                records: cp.size(),
                root: Some(*cp.root()),
                binding,
            }),
            Err(e) => faults.push(AuditFault {
                seq: None,
                checkpoint: None,
                kind: match e {
                    CheckpointError::Note(_) => FaultKind::BadSignature,
                    CheckpointError::WrongOrigin { .. } => FaultKind::WrongOrigin,
                    _ => FaultKind::CheckpointMalformed,
                },
                message: format!(
                    "witness {}: not a checkpoint of this log signed by the verifier key: {e}",
                    w.label
                ),
            }),
        }
    }
    (knowledge, faults)
}

fn unavailable(copy: &str, message: String) -> CrossCheck {
    CrossCheck {
        copy: copy.to_owned(),
        against: "-".to_owned(),
        copy_records: None,
        known_records: None,
        outcome: CrossOutcome::Unavailable,
        message,
    }
}

/// `custos audit verify`: verifies the local log in `dir` in full and holds
/// it to its state, to the store copy's latest signed checkpoint and to
/// witnesses; holds the store copy to the state's replication marker.
/// `store: None` (`--offline`) skips the store copy; a store that cannot be
/// read is a fault (the cut the store would show cannot be ruled out).
pub async fn verify_local_copy(
    dir: &Path,
    verifier: &VerifierKey,
    store: Option<&SharedStore>,
    witnesses: &[Witness],
) -> Result<VerifyReport> {
    // With appends running: the marker is read before the store copy (which
    // only grows past it), the store copy before the log (always ahead of it).
    let marker = read_remembered(dir).replicated;
    let (mut knowledge, mut faults) = witness_knowledge(witnesses, verifier, true);
    let mut checks = Vec::new();
    let store_extent = match store {
        None => {
            checks.push(unavailable(
                STORE_COPY,
                "not read (--offline): a cut of the local log that the store copy would show is not ruled out".into(),
            ));
            None
        }
        Some(store) => match store_extent(store, verifier).await {
            Ok(e) => Some(e),
            Err(e) => {
                let message = format!(
                    "the store copy could not be read to cross-check the local log: {e} (pass --offline to verify the local log alone)"
                );
                faults.push(AuditFault {
                    seq: None,
                    checkpoint: None,
                    kind: FaultKind::CrossCheckUnavailable,
                    message: message.clone(),
                });
                checks.push(unavailable(STORE_COPY, message));
                None
            }
        },
    };
    if let Some((size, root)) = store_extent.and_then(|e| e.signed) {
        knowledge.push(Knowledge {
            source: format!("the store copy's latest signed checkpoint ({size})"),
            records: size,
            root: Some(root),
            binding: true,
        });
    }
    let (d, v) = (dir.to_owned(), verifier.clone());
    let mut report = tokio::task::spawn_blocking(move || verify_dir_with(&d, &v, knowledge))
        .await
        .map_err(|e| Error::Internal(format!("audit verification task failed: {e}")))??;
    if let Some(e) = store_extent {
        let mut k = Vec::new();
        if let Some(records) = marker {
            k.push(Knowledge {
                source: format!("the state's replication marker ({REPLICATED_FILE})"),
                records,
                root: None,
                binding: true,
            });
        }
        k.push(Knowledge {
            source: "the local log".into(),
            records: report.records,
            root: None,
            binding: false,
        });
        let (c, f) = hold_to_knowledge(STORE_COPY, e.proven(), &k, |_| false);
        checks.extend(c);
        faults.extend(f);
    }
    report.cross_checks.extend(checks);
    report.faults.extend(faults);
    Ok(report)
}

/// `custos audit verify --from-store`: verifies the store copy in full and
/// holds it to the local state's replication marker (and compares it with
/// the local log and witnesses, which it may lag); then holds the local log
/// (`dir`, when there is one) to what the store copy signed, its state and
/// the witnesses.
pub async fn verify_store_copy(
    store: &SharedStore,
    dir: &Path,
    verifier: &VerifierKey,
    witnesses: &[Witness],
) -> Result<VerifyReport> {
    // The local state before the store copy: the store only grows past the
    // marker; the local log again after it: it is always ahead of the store.
    let (d, v) = (dir.to_owned(), verifier.clone());
    let before = tokio::task::spawn_blocking(move || local_extent(&d, &v))
        .await
        .map_err(|e| Error::Internal(format!("audit verification task failed: {e}")))??;
    let (witnessed, witness_faults) = witness_knowledge(witnesses, verifier, false);
    let mut knowledge = witnessed.clone();
    if let Some((ext, remembered)) = before {
        knowledge.extend(remembered_knowledge(remembered, false));
        if let Some((size, root)) = ext.signed {
            knowledge.push(Knowledge {
                source: format!("the local log's latest signed checkpoint ({size})"),
                records: size,
                root: Some(root),
                binding: false,
            });
        }
    }
    let mut report = verify_store_with(store, verifier, knowledge).await?;
    report.faults.extend(witness_faults);
    let (d, v) = (dir.to_owned(), verifier.clone());
    let after = tokio::task::spawn_blocking(move || local_extent(&d, &v))
        .await
        .map_err(|e| Error::Internal(format!("audit verification task failed: {e}")))?;
    match after {
        Ok(Some((ext, remembered))) => {
            let mut k = remembered_knowledge(remembered, true);
            // Witnesses were taken from the local log: it must hold them.
            k.extend(
                witnessed
                    .into_iter()
                    .map(|w| Knowledge { binding: true, ..w }),
            );
            if let Some(size) = report.latest_checkpoint {
                k.push(Knowledge {
                    source: format!("the store copy's latest signed checkpoint ({size})"),
                    records: size,
                    root: None,
                    binding: true,
                });
            }
            let (c, f) = hold_to_knowledge(LOCAL_COPY, ext.records, &k, |_| false);
            report.cross_checks.extend(c);
            report.faults.extend(f);
        }
        Ok(None) => report.cross_checks.push(unavailable(
            LOCAL_COPY,
            format!("no local log in {}", dir.display()),
        )),
        Err(e) => {
            let message = format!("the local log could not be read to cross-check: {e}");
            report.faults.push(AuditFault {
                seq: None,
                checkpoint: None,
                kind: FaultKind::CrossCheckUnavailable,
                message: message.clone(),
            });
            report.cross_checks.push(unavailable(LOCAL_COPY, message));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::key::AuditKey;
    use crate::audit::log::AuditLog;
    use crate::audit::pending::pending_text;
    use serde_json::json;
    use std::fs;

    fn key() -> AuditKey {
        AuditKey::from_seed(&[3; 32])
    }

    /// A crash between a record and its checkpoint: with custos' signed
    /// intent the unsigned record is reported as an interrupted append (not
    /// a fault); the same record with no intent, or an intent signed by
    /// another key, is "appended without signature".
    #[tokio::test]
    async fn an_append_interrupted_before_its_checkpoint_is_told_apart_from_a_forged_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), key(), None).unwrap();
        log.append("a", None, "t", json!({})).await.unwrap();
        log.append("b", None, "t", json!({})).await.unwrap();
        assert!(!dir.path().join(PENDING_FILE).exists(), "removed once done");
        // Undo the checkpoint of record 1, as a crash before it would.
        fs::remove_file(dir.path().join(CHECKPOINT_DIR).join("2")).unwrap();
        let lines = log.read_lines(2).unwrap();
        let leaf = record::leaf_hash(&lines[1]);
        let verifier = key().verifier().clone();
        let report = verify_dir(dir.path(), &verifier).unwrap();
        assert!(!report.ok(), "no intent: a forged append");
        for (signer, ok) in [(AuditKey::from_seed(&[4; 32]), false), (key(), true)] {
            let note = signer.sign_note(&pending_text(2, &leaf)).unwrap();
            fs::write(dir.path().join(PENDING_FILE), note).unwrap();
            let report = verify_dir(dir.path(), &verifier).unwrap();
            assert_eq!(report.ok(), ok, "{report:?}");
            assert_eq!(report.interrupted_append, ok.then_some(1));
        }
        // An intent for another record does not cover this one.
        let note = key().sign_note(&pending_text(2, &[0; 32])).unwrap();
        fs::write(dir.path().join(PENDING_FILE), note).unwrap();
        assert!(!verify_dir(dir.path(), &verifier).unwrap().ok());
        // The next append completes record 1 and clears the intent.
        log.append("c", None, "t", json!({})).await.unwrap();
        let report = verify_dir(dir.path(), &verifier).unwrap();
        assert!(
            report.ok() && report.interrupted_append.is_none(),
            "{report:?}"
        );
        assert!(!dir.path().join(PENDING_FILE).exists());
    }

    fn knows(source: &str, records: u64, root: Option<Hash>, binding: bool) -> Knowledge {
        Knowledge {
            source: source.into(),
            records,
            root,
            binding,
        }
    }

    #[test]
    fn a_copy_is_cut_only_by_what_got_its_records_from_it() {
        let k = [
            knows("the marker", 7, None, true),
            knows("the state", 9, None, true),
            knows("the replica", 12, None, false),
            knows("an old witness", 3, None, true),
        ];
        let (checks, faults) = hold_to_knowledge("local log", 5, &k, |_| false);
        let outcomes: Vec<CrossOutcome> = checks.iter().map(|c| c.outcome).collect();
        assert_eq!(
            outcomes,
            [
                CrossOutcome::Cut,
                CrossOutcome::Cut,
                CrossOutcome::Behind,
                CrossOutcome::Consistent
            ]
        );
        // One fault for the copy, up to the most any binding source knows,
        // naming each of them.
        assert_eq!(faults.len(), 1, "{faults:#?}");
        let f = &faults[0];
        assert_eq!(
            (f.kind, f.seq, f.checkpoint),
            (FaultKind::Cut, Some(5), None)
        );
        assert!(
            f.message.contains("records 5..8 were removed"),
            "{}",
            f.message
        );
        assert!(
            f.message.contains("the marker knows 7") && f.message.contains("the state knows 9"),
            "{}",
            f.message
        );
        let (_, faults) = hold_to_knowledge("store copy", 12, &k, |_| false);
        assert!(faults.is_empty(), "{faults:#?}");
    }

    #[test]
    fn a_root_that_differs_is_a_divergence_and_a_matching_one_is_not() {
        let key = crate::audit::AuditKey::from_seed(&[1; 32]);
        let lines: Vec<Vec<u8>> = (0..4u64)
            .map(|i| format!("line {i}").into_bytes())
            .collect();
        let leaves: Vec<Hash> = lines.iter().map(|l| record::leaf_hash(l)).collect();
        let mut v = LogVerifier::new(Vec::new(), key.verifier()).copy_name("store copy");
        v.expect(knows("good", 2, Some(merkle::root(&leaves[..2])), true));
        v.expect(knows("bad", 3, Some([7; 32]), false));
        v.expect(knows("empty", 0, Some(merkle::empty_root()), true));
        for l in &lines {
            v.push(l);
        }
        let report = v.finish();
        let by = |s: &str| {
            report
                .cross_checks
                .iter()
                .find(|c| c.against == s)
                .unwrap()
                .outcome
        };
        assert_eq!(by("good"), CrossOutcome::Consistent);
        assert_eq!(by("bad"), CrossOutcome::Diverged);
        assert_eq!(by("empty"), CrossOutcome::Consistent);
        assert!(
            report
                .faults
                .iter()
                .any(|f| f.kind == FaultKind::Diverged && f.checkpoint == Some(3)),
            "{:#?}",
            report.faults
        );
        assert!(report.cross_checks.iter().all(|c| c.copy == "store copy"));
    }
}

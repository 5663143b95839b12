//! `custos check`: verifies a tenant's repository and reports every fault.
//!
//! Structure: every index file and snapshot opens; every blob a snapshot
//! names is indexed; every index entry lies inside an existing pack.
//! With read-data: every pack (or a chosen subset) is read whole, its header
//! commitment and directory are verified, the directory agrees with the
//! index, and every blob decrypts, decompresses and hashes to its id.

mod pack_read;

use std::collections::BTreeMap;

use futures::StreamExt;
use serde::Serialize;

use crate::error::{ErrorKind, Result};
use crate::format::ids::{BlobId, IdMap, PackId};
use crate::format::tree::{Entry, EntryKind};
use crate::pipeline::tree::{SeenTreeBlobs, TreeItem, TreeReader};
use crate::repo::{Fault, Repo, is_object_fault};
use crate::store::ObjectName;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    None,
    All,
    /// Packs whose id falls in slice `n` of `of` (1-based), so a scheduled check
    /// reads every pack over `of` runs.
    Subset {
        n: u32,
        of: u32,
    },
}

impl ReadData {
    /// `"none"`, `"all"`, or the slice as `"n/of"`: how reports and the
    /// audit log name what was read.
    pub fn label(self) -> String {
        match self {
            ReadData::None => "none".into(),
            ReadData::All => "all".into(),
            ReadData::Subset { n, of } => format!("{n}/{of}"),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// What was read whole: `"none"` (structure only), `"all"` (every pack),
    /// or the slice `"n/of"` of the packs.
    pub read_data: String,
    pub snapshots: usize,
    pub index_files: usize,
    pub packs: usize,
    pub blobs: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Packs no index refers to (left by an interrupted job; prune removes them).
    pub unreferenced_packs: usize,
    pub faults: Vec<Fault>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.faults.is_empty()
    }
}

const PACKS_IN_FLIGHT: usize = 4;

pub async fn run(repo: &Repo, read_data: ReadData) -> Result<CheckReport> {
    let mut report = CheckReport {
        read_data: read_data.label(),
        ..Default::default()
    };
    // One after another, before the snapshots: a key that fails here fails
    // the job (or is one fault) before every snapshot read tries it again.
    for epoch in repo.live_epochs() {
        if let Err(err) = repo.epoch_keys(epoch).await {
            if is_object_fault(&err) {
                report.faults.push(Fault::from_error(
                    repo.store().display(&ObjectName::Envelope(epoch)),
                    &err,
                ));
            } else {
                return Err(err);
            }
        }
    }
    // Snapshots before the index: a backup running beside this check writes
    // its index before its snapshot, so every snapshot listed here has its
    // index files in the listing below.
    let (snapshots, snapshot_faults) = repo.list_snapshots().await?;
    let (index, faults) = repo.load_index().await?;
    report.faults.extend(
        faults
            .into_iter()
            .filter(|f| f.kind != ErrorKind::UnknownObject),
    );
    report.index_files = index.files.len();
    report.blobs = index.blob_count();
    let packs = repo.list_packs().await?;
    report.packs = packs.len();

    // Index entries must lie inside existing packs.
    let indexed = index.by_pack();
    for (pack, _) in indexed.packs() {
        let name = repo.store().display(&ObjectName::Pack(pack));
        match packs.get(&pack) {
            None => report.faults.push(Fault {
                object: name,
                kind: ErrorKind::MissingObject,
                message: format!(
                    "pack is missing; {} indexed blob(s) live in it",
                    indexed.len(&pack)
                ),
            }),
            Some(&size) => {
                if let Some(e) = indexed
                    .entries(&pack)
                    .into_iter()
                    .find(|e| e.offset as u64 + e.sealed_len as u64 > size)
                {
                    report.faults.push(Fault {
                        object: name,
                        kind: ErrorKind::CorruptObject,
                        message: format!(
                            "pack is {size} bytes but blob {} ends at {} (truncated)",
                            e.id.short(),
                            e.offset as u64 + e.sealed_len as u64
                        ),
                    });
                }
            }
        }
    }
    report.unreferenced_packs = packs.keys().filter(|p| !indexed.contains(p)).count();

    // Every blob of every snapshot must be indexed.
    report.faults.extend(
        snapshot_faults
            .into_iter()
            .filter(|f| f.kind != ErrorKind::UnknownObject),
    );
    report.snapshots = snapshots.len();
    // Snapshots share most of their tree: each tree blob is read once, and
    // what the lines it holds lack is remembered for the next snapshot
    // that holds it (a tree blob with none is not remembered).
    let mut seen_trees = SeenTreeBlobs::default();
    let mut found_in: IdMap<BlobId, Unreadable> = IdMap::default();
    for s in &snapshots {
        let what = repo.store().display(&ObjectName::Snapshot(s.id));
        let missing_tree = s.tree.iter().filter(|b| !index.contains(b)).count();
        if missing_tree > 0 {
            report.faults.push(Fault {
                object: what.clone(),
                kind: ErrorKind::MissingObject,
                message: format!("{missing_tree} tree blob(s) are in no index file (index rolled back or data lost)"),
            });
            continue;
        }
        let mut tree =
            TreeReader::new(repo, &index, &s.tree, what.clone()).sharing(&mut seen_trees);
        // Indexed, but in a pack the store does not have (deleted, lost) or
        // has cut short: the snapshot cannot be restored whole, so it is
        // named, not only the pack.
        let mut unreadable = Unreadable::default();
        // The blob whose lines are being read, and what they lack so far:
        // remembered (replacing what an interrupted read of it left) once
        // the next item is not within it.
        let mut reading: Option<(BlobId, Unreadable)> = None;
        loop {
            let item = tree.next_item().await;
            let within = match &item {
                Ok(Some(TreeItem::Entry { within, .. })) => *within,
                _ => None,
            };
            if reading.as_ref().map(|(b, _)| *b) != within {
                if let Some((blob, lacks)) = reading.take()
                    && lacks.any()
                {
                    found_in.insert(blob, lacks);
                }
                reading = within.map(|b| (b, Unreadable::default()));
            }
            match item {
                Ok(Some(TreeItem::Entry { entry: e, .. })) if e.kind == EntryKind::File => {
                    let mut this = Unreadable::default();
                    for b in &e.blobs {
                        match index.get(b) {
                            None => this.missing.add(&e),
                            Some(loc) if !index.is_stored_at(loc, &packs) => this.lost.add(&e),
                            Some(_) => {}
                        }
                    }
                    unreadable.add(&this);
                    if let Some((_, lacks)) = &mut reading {
                        lacks.add(&this);
                    }
                }
                // Its lines were checked in an earlier snapshot: what they
                // lack, this one lacks too.
                Ok(Some(TreeItem::Seen(blob))) => {
                    if let Some(u) = found_in.get(&blob) {
                        unreadable.add(u);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if is_object_fault(&e) => {
                    report.faults.push(Fault::from_error(what.clone(), &e));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let Unreadable { missing, lost } = unreadable;
        if lost.count > 0 {
            report.faults.push(Fault {
                object: what.clone(),
                kind: ErrorKind::MissingObject,
                message: format!(
                    "{} blob(s) are in packs missing from the store or cut short, e.g. in {} \
                     (data lost; the next backup stores again what the sources still hold)",
                    lost.count,
                    lost.example.unwrap_or_default()
                ),
            });
        }
        if missing.count > 0 {
            report.faults.push(Fault {
                object: what,
                kind: ErrorKind::MissingObject,
                message: format!(
                    "{} blob(s) are in no index file, e.g. in {} (index rolled back or data lost)",
                    missing.count,
                    missing.example.unwrap_or_default()
                ),
            });
        }
    }

    if read_data != ReadData::None {
        let selected: Vec<(PackId, u64)> = packs
            .iter()
            .filter(|(p, _)| match read_data {
                ReadData::Subset { n, of } => {
                    ((u32::from_be_bytes(p.0[..4].try_into().expect("4")) as u64 * of as u64) >> 32)
                        as u32
                        == n - 1
                }
                _ => true,
            })
            .map(|(p, s)| (*p, *s))
            .collect();
        let checks = selected.into_iter().map(|(pack, size)| {
            let expected = indexed.entries(&pack);
            pack_read::read_pack(repo, pack, size, expected, index.pack_epoch(&pack))
        });
        let mut stream = futures::stream::iter(checks).buffer_unordered(PACKS_IN_FLIGHT);
        while let Some(r) = stream.next().await {
            let (bytes, faults) = r?;
            report.packs_read += 1;
            report.bytes_read += bytes;
            report.faults.extend(faults);
        }
    }
    Ok(report)
}

/// File blobs a snapshot names but cannot restore, counted with the first
/// file that names one.
#[derive(Debug, Clone, Default)]
struct Unreadable {
    /// In no index file.
    missing: Counted,
    /// Indexed in a pack that is not stored (or cut short).
    lost: Counted,
}

#[derive(Debug, Clone, Default)]
struct Counted {
    count: usize,
    example: Option<String>,
}

impl Counted {
    fn add(&mut self, file: &Entry) {
        self.count += 1;
        self.example.get_or_insert_with(|| file.display_path());
    }

    fn merge(&mut self, other: &Counted) {
        self.count += other.count;
        if self.example.is_none() {
            self.example.clone_from(&other.example);
        }
    }
}

impl Unreadable {
    fn any(&self) -> bool {
        self.missing.count + self.lost.count > 0
    }

    fn add(&mut self, other: &Unreadable) {
        self.missing.merge(&other.missing);
        self.lost.merge(&other.lost);
    }
}

impl CheckReport {
    /// When faults were found: the kind of the first (`missing_object`,
    /// `corrupt_object`, …) and a message counting them and naming the first.
    pub fn failure_summary(&self) -> Option<(ErrorKind, String)> {
        let first = self.faults.first()?;
        let mut kinds: BTreeMap<ErrorKind, usize> = BTreeMap::new();
        for f in &self.faults {
            *kinds.entry(f.kind).or_default() += 1;
        }
        let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        Some((
            first.kind,
            format!(
                "check found {} fault(s) ({}); first: {}: {}",
                self.faults.len(),
                counts.join(", "),
                first.object,
                first.message
            ),
        ))
    }
}

impl crate::report::JobOutput for CheckReport {
    fn metrics(&self) -> crate::report::JobMetrics {
        crate::report::JobMetrics {
            bytes_in: Some(self.bytes_read),
            ..Default::default()
        }
    }

    /// What a compliance report cites of a check: what it read and found.
    fn audit_result(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "read_data": self.read_data,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "packs_read": self.packs_read,
            "blobs": self.blobs,
            "bytes_read": self.bytes_read,
            "faults": self.faults.len(),
        }))
    }

    /// A check that ran and found faults is a failed job (`outcome=failure`,
    /// the first fault's kind as `error_kind`), its report kept in full.
    fn failure(&self) -> Option<(&'static str, String)> {
        self.failure_summary()
            .map(|(kind, message)| (kind.as_str(), message))
    }
}

//! Writing and reading snapshot trees: JSON-lines entries, cut into tree blobs
//! by content-defined chunking (so unchanged parts of a tree deduplicate).

use crate::error::{Error, Result};
use crate::format::ids::{BlobId, IdMap};
use crate::format::pack::BlobKind;
use crate::format::tree::Entry;
use crate::keys::derive::EpochKeys;
use crate::pipeline::blobs::read_blobs;
use crate::pipeline::chunker::{Chunker, TREE_CHUNKS};
use crate::pipeline::packer::Packer;
use crate::repo::{Index, Repo};

/// Accumulates entries and stores full tree chunks as they form.
pub struct TreeWriter {
    chunker: Chunker,
    buf: Vec<u8>,
    blobs: Vec<BlobId>,
    pub new_blobs: u64,
}

impl TreeWriter {
    pub fn new(keys: &EpochKeys) -> Self {
        TreeWriter {
            chunker: Chunker::new(TREE_CHUNKS, keys.chunker_seed()),
            buf: Vec::new(),
            blobs: Vec::new(),
            new_blobs: 0,
        }
    }

    /// Appends an entry; blocks when a tree blob must be queued on the packer.
    pub fn push(&mut self, entry: &Entry, keys: &EpochKeys, packer: &Packer) -> Result<()> {
        entry.to_json_line(&mut self.buf);
        if self.buf.len() >= 4 * TREE_CHUNKS.max as usize {
            self.flush(false, keys, packer)?;
        }
        Ok(())
    }

    fn flush(&mut self, all: bool, keys: &EpochKeys, packer: &Packer) -> Result<()> {
        let max = TREE_CHUNKS.max as usize;
        let mut pos = 0;
        while pos < self.buf.len() && (all || self.buf.len() - pos >= max) {
            let n = self.chunker.cut(&self.buf[pos..]);
            let chunk = &self.buf[pos..pos + n];
            let id = BlobId(keys.blob_id(chunk));
            if packer.claim(&id) {
                packer.add_copy(id, BlobKind::Tree, chunk)?;
                self.new_blobs += 1;
            }
            self.blobs.push(id);
            pos += n;
        }
        self.buf.drain(..pos);
        Ok(())
    }

    /// Stores what is left and returns the tree's blob list.
    pub fn finish(mut self, keys: &EpochKeys, packer: &Packer) -> Result<(Vec<BlobId>, u64)> {
        self.flush(true, keys, packer)?;
        Ok((self.blobs, self.new_blobs))
    }
}

/// Tree blobs read ahead in one request: the run of blobs that follow in
/// the same pack, up to this many sealed bytes (at least one blob).
const READ_AHEAD_BYTES: u64 = 8 << 20;

/// Tree blobs whose whole lines a reader has yielded and its caller
/// accepted (the caller asked for the next item after the last of them),
/// with the bytes before their first and after their last line break.
/// A reader sharing it does not read such a blob again: it yields
/// [`TreeItem::Seen`] and parses only the lines that cross the blob's
/// edges. Identical tree blobs (the same keyed id, so the same bytes) hold
/// identical lines, so the snapshots of a tenant, which share most of
/// their tree, are read once between them instead of once each.
#[derive(Default)]
pub struct SeenTreeBlobs {
    edges: IdMap<BlobId, Edges>,
    /// The bytes of the edges kept, at most [`SeenTreeBlobs::BUDGET`].
    bytes: usize,
}

impl SeenTreeBlobs {
    /// Beyond this, blobs seen are no longer remembered: a later tree
    /// reads them again.
    const BUDGET: usize = 32 << 20;

    fn contains(&self, id: &BlobId) -> bool {
        self.edges.contains_key(id)
    }

    fn insert(&mut self, id: BlobId, edges: Edges) {
        let cost = edges.len() + std::mem::size_of::<(BlobId, Edges)>();
        if self.bytes + cost <= Self::BUDGET {
            self.bytes += cost;
            self.edges.insert(id, edges);
        }
    }
}

struct Edges {
    /// Up to and including the first `\n`.
    head: Box<[u8]>,
    /// After the last `\n`.
    tail: Box<[u8]>,
}

impl Edges {
    /// The edges of `blob` when keeping them is worth it: they are at most
    /// a quarter of it (most of it is whole lines, skipped when seen
    /// again). `None` for a blob without a line break, or mostly one long
    /// line: read again if it comes again.
    fn worth_keeping(blob: &[u8]) -> Option<Edges> {
        Edges::of(blob).filter(|e| e.len() <= blob.len() / 4)
    }

    fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// `None` for a blob without a line break (all of it is one line's middle).
    fn of(blob: &[u8]) -> Option<Edges> {
        let first = blob.iter().position(|&b| b == b'\n')?;
        let last = blob.iter().rposition(|&b| b == b'\n')?;
        Some(Edges {
            head: blob[..=first].into(),
            tail: blob[last + 1..].into(),
        })
    }
}

/// What [`TreeReader::next_item`] yields.
pub enum TreeItem {
    /// An entry, and the tree blob that holds its line, when that is not
    /// the blob's first line (`None`: a first line, which may continue one
    /// from the blob before, a line crossing into the next blob, any line
    /// of a blob whose edges are not kept, or a reader not sharing seen
    /// blobs). A [`TreeItem::Seen`] blob stands for exactly the lines
    /// yielded `within` it when it was read.
    Entry {
        entry: Entry,
        within: Option<BlobId>,
    },
    /// A tree blob whose whole lines were yielded before (by this reader or
    /// another sharing its [`SeenTreeBlobs`]): not read again.
    Seen(BlobId),
}

/// Streams the entries of a tree, reading the blobs that follow in the same
/// pack together (a tree's blobs were written in order, so a run of them is
/// one ranged request instead of one per blob), holding at most
/// [`READ_AHEAD_BYTES`] of them besides the one being parsed.
pub struct TreeReader<'a> {
    repo: &'a Repo,
    index: &'a Index,
    lines: Lines,
    /// Plaintexts read ahead, by position in the tree (a position skipped
    /// as seen leaves its plaintext to be dropped).
    ready: std::collections::VecDeque<(usize, Vec<u8>)>,
    what: String,
    seen: Option<&'a mut SeenTreeBlobs>,
}

impl<'a> TreeReader<'a> {
    pub fn new(repo: &'a Repo, index: &'a Index, tree: &[BlobId], what: String) -> Self {
        TreeReader {
            repo,
            index,
            lines: Lines::new(tree.to_vec()),
            ready: Default::default(),
            what,
            seen: None,
        }
    }

    /// A reader that skips the tree blobs in `seen` and adds those it reads
    /// whole: for jobs that walk many snapshots ([`TreeReader::next_item`]).
    pub fn sharing(mut self, seen: &'a mut SeenTreeBlobs) -> Self {
        self.seen = Some(seen);
        self
    }

    /// The blobs to read from position `at` on, by position: those not
    /// seen that lie in the pack of the first, until a blob of another
    /// pack (or one the index lacks, which its read reports) or
    /// [`READ_AHEAD_BYTES`]; seen blobs between them are passed over (one
    /// ranged read still fetches the rest).
    fn run_from(&self, at: usize) -> Vec<(usize, BlobId)> {
        let tree = &self.lines.tree;
        let Some(pack) = self.index.get(&tree[at]).map(|l| l.pack) else {
            return vec![(at, tree[at])];
        };
        let seen = |id: &BlobId| self.seen.as_ref().is_some_and(|s| s.contains(id));
        let mut bytes = 0u64;
        let mut run = Vec::new();
        for (p, id) in tree.iter().enumerate().skip(at) {
            if p > at && seen(id) {
                continue;
            }
            match self.index.get(id) {
                Some(l) if l.pack == pack => {
                    bytes += l.sealed_len as u64;
                    if bytes > READ_AHEAD_BYTES && !run.is_empty() {
                        break;
                    }
                    run.push((p, *id));
                }
                _ => break,
            }
        }
        run
    }

    /// The plaintext of the tree blob at position `at`, read ahead or read
    /// now with the run that follows it.
    async fn blob_at(&mut self, at: usize) -> Result<Vec<u8>> {
        while self.ready.front().is_some_and(|(p, _)| *p < at) {
            self.ready.pop_front();
        }
        if let Some((p, _)) = self.ready.front()
            && *p == at
        {
            let (_, blob) = self.ready.pop_front().expect("front checked");
            return Ok(blob);
        }
        let run = self.run_from(at);
        let ids: Vec<BlobId> = run.iter().map(|(_, id)| *id).collect();
        let read = read_blobs(self.repo, self.index, &ids).await?;
        self.ready = run
            .iter()
            .map(|(p, _)| *p)
            .zip(read.into_iter().map(|(plain, _)| plain))
            .collect();
        match self.ready.pop_front() {
            Some((p, blob)) if p == at => Ok(blob),
            _ => Err(Error::Internal("a tree blob read returned nothing".into())),
        }
    }

    pub async fn next_entry(&mut self) -> Result<Option<Entry>> {
        loop {
            match self.next_item().await? {
                Some(TreeItem::Entry { entry, .. }) => return Ok(Some(entry)),
                Some(TreeItem::Seen(_)) => {}
                None => return Ok(None),
            }
        }
    }

    pub async fn next_item(&mut self) -> Result<Option<TreeItem>> {
        loop {
            match self.lines.step(self.seen.as_deref_mut()) {
                Step::Line(line, within) => {
                    let entry = Entry::from_json_line(self.lines.line(line)).map_err(|e| {
                        Error::corrupt(self.what.clone(), format!("bad tree entry: {e}"))
                    })?;
                    return Ok(Some(TreeItem::Entry { entry, within }));
                }
                Step::Seen(id) => return Ok(Some(TreeItem::Seen(id))),
                Step::Need(at) => {
                    let blob = self.blob_at(at).await?;
                    self.lines.feed(blob, self.seen.is_some());
                }
                Step::End => return Ok(None),
                Step::Truncated => {
                    return Err(Error::corrupt(
                        self.what.clone(),
                        "tree ends in the middle of an entry",
                    ));
                }
            }
        }
    }
}

/// What [`Lines::step`] found next.
#[derive(Debug, PartialEq)]
enum Step {
    /// A whole line (a range for [`Lines::line`]) and the blob it is
    /// within, as [`TreeItem::Entry`] states it.
    Line(std::ops::Range<usize>, Option<BlobId>),
    /// The blob at the next position was seen: its edges stand in for it.
    Seen(BlobId),
    /// The plaintext of the blob at this position is needed ([`Lines::feed`]).
    Need(usize),
    End,
    /// The last blob ended without a line break.
    Truncated,
}

/// The line splitting of [`TreeReader`], without its reads: a tree's blobs
/// go in ([`Lines::feed`]), lines come out, and blobs seen before are
/// stood in for by their edges.
struct Lines {
    tree: Vec<BlobId>,
    /// The position in `tree` of the next blob to append.
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    /// When sharing a [`SeenTreeBlobs`]: the blob last appended (read, not
    /// skipped) if it has a line break, where its lines after the first
    /// start in `buf`, and its edges, added to the seen blobs once its
    /// lines have all been taken.
    current: Option<(BlobId, usize, Edges)>,
    /// A seen blob whose edges were appended, and where its head ends in
    /// `buf`: [`Step::Seen`] is due once the line ending there is taken.
    seen_here: Option<(BlobId, usize)>,
}

impl Lines {
    fn new(tree: Vec<BlobId>) -> Lines {
        Lines {
            tree,
            next: 0,
            buf: Vec::new(),
            pos: 0,
            current: None,
            seen_here: None,
        }
    }

    fn line(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    fn step(&mut self, mut seen: Option<&mut SeenTreeBlobs>) -> Step {
        // A seen blob stands where its own lines would be: after the line
        // that ends in its head.
        if let Some((id, head_end)) = self.seen_here
            && self.pos >= head_end
        {
            self.seen_here = None;
            return Step::Seen(id);
        }
        if let Some(nl) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
            let start = self.pos;
            self.pos += nl + 1;
            let within = match &self.current {
                Some((id, from, _)) if start >= *from => Some(*id),
                _ => None,
            };
            return Step::Line(start..start + nl, within);
        }
        // Every line of the current blob was taken (and the caller came
        // back for more): it is seen.
        if let Some((id, _, edges)) = self.current.take()
            && let Some(seen) = seen.as_deref_mut()
        {
            seen.insert(id, edges);
        }
        let Some(&id) = self.tree.get(self.next) else {
            return match self.pos < self.buf.len() {
                true => Step::Truncated,
                false => Step::End,
            };
        };
        self.buf.drain(..self.pos);
        self.pos = 0;
        if let Some(edges) = seen.and_then(|s| s.edges.get(&id)) {
            self.next += 1;
            self.buf.extend_from_slice(&edges.head);
            self.seen_here = Some((id, self.buf.len()));
            self.buf.extend_from_slice(&edges.tail);
            // A line ends in the head: that is the next step.
            return self.step(None);
        }
        Step::Need(self.next)
    }

    /// The plaintext of the blob [`Step::Need`] asked for.
    fn feed(&mut self, blob: Vec<u8>, sharing: bool) {
        let id = self.tree[self.next];
        self.next += 1;
        if sharing && let Some(edges) = Edges::worth_keeping(&blob) {
            // The first line may continue one from the blob before: never
            // counted as within this blob, read or skipped.
            self.current = Some((id, self.buf.len() + edges.head.len(), edges));
        }
        self.buf.extend_from_slice(&blob);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Ids from content, as keyed ids are: equal bytes, equal id.
    fn id(bytes: &[u8]) -> BlobId {
        BlobId(*blake3::hash(bytes).as_bytes())
    }

    /// What a walk yields: a line and the blob it is within, or a blob
    /// skipped.
    #[derive(Debug)]
    enum Item {
        Line(Vec<u8>, Option<BlobId>),
        Seen(BlobId),
    }

    /// Walks a tree of `blobs` as [`TreeReader`] does: what it yields, in
    /// order, and how it ended.
    fn walk(blobs: &[Vec<u8>], mut seen: Option<&mut SeenTreeBlobs>) -> (Vec<Item>, Step) {
        let by_id: HashMap<BlobId, &Vec<u8>> = blobs.iter().map(|b| (id(b), b)).collect();
        let mut lines = Lines::new(blobs.iter().map(|b| id(b)).collect());
        let mut out = Vec::new();
        loop {
            match lines.step(seen.as_deref_mut()) {
                Step::Line(r, within) => out.push(Item::Line(lines.line(r).to_vec(), within)),
                Step::Seen(id) => out.push(Item::Seen(id)),
                Step::Need(at) => {
                    let blob = by_id[&lines.tree[at]].clone();
                    lines.feed(blob, seen.is_some());
                }
                end => return (out, end),
            }
        }
    }

    fn split(blobs: &[Vec<u8>]) -> (Vec<Vec<u8>>, Step) {
        let all: Vec<u8> = blobs.concat();
        let mut lines: Vec<Vec<u8>> = all.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        let rest = lines.pop().unwrap_or_default();
        (
            lines,
            if rest.is_empty() {
                Step::End
            } else {
                Step::Truncated
            },
        )
    }

    proptest::proptest! {
        /// Snapshots made of a pool of tree blobs (line breaks anywhere,
        /// blobs without any, repeats), walked one after the other sharing
        /// the seen blobs: each yields its lines but those of the blobs it
        /// skips, and a skipped blob stands for exactly the lines yielded
        /// within it when it was read, so every snapshot adds up to all its
        /// lines, and ends as it would unshared.
        #[test]
        fn a_skipped_blob_stands_for_exactly_its_lines(
            pool in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', b'\n']), 0..64),
                1..8,
            ),
            trees in proptest::collection::vec(proptest::collection::vec(0usize..8, 0..10), 1..6),
        ) {
            let mut seen = SeenTreeBlobs::default();
            let mut within: HashMap<BlobId, Vec<Vec<u8>>> = HashMap::new();
            for tree in trees {
                let blobs: Vec<Vec<u8>> = tree.iter().map(|&i| pool[i % pool.len()].clone()).collect();
                let (want, want_end) = split(&blobs);
                // Unshared: every line, in order, nothing skipped.
                let (alone, end) = walk(&blobs, None);
                proptest::prop_assert_eq!(&end, &want_end);
                let mut lines = Vec::new();
                for item in alone {
                    match item {
                        Item::Line(line, _) => lines.push(line),
                        Item::Seen(_) => proptest::prop_assert!(false, "skipped unshared"),
                    }
                }
                proptest::prop_assert_eq!(&lines, &want);
                // Shared: a skipped blob stands, in place, for the lines
                // yielded within it when it was read.
                let (items, end) = walk(&blobs, Some(&mut seen));
                proptest::prop_assert_eq!(&end, &want_end);
                let mut got: Vec<Vec<u8>> = Vec::new();
                for item in items {
                    match item {
                        Item::Line(line, within_blob) => {
                            if let Some(w) = within_blob {
                                within.entry(w).or_default().push(line.clone());
                            }
                            got.push(line);
                        }
                        Item::Seen(s) => got.extend(within.get(&s).cloned().unwrap_or_default()),
                    }
                }
                proptest::prop_assert_eq!(got, want);
            }
        }
    }
}

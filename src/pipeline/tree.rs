//! Writing and reading snapshot trees: JSON-lines entries, cut into tree blobs
//! by content-defined chunking (so unchanged parts of a tree deduplicate).

use crate::error::{Error, Result};
use crate::format::ids::BlobId;
use crate::format::pack::BlobKind;
use crate::format::tree::Entry;
use crate::keys::derive::EpochKeys;
use crate::pipeline::blobs::read_blobs;
use crate::pipeline::chunker::{Chunker, TREE_CHUNKS};
use crate::pipeline::packer::{Packer, Work};
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
                packer.add(Work::Raw {
                    id,
                    kind: BlobKind::Tree,
                    data: chunk.to_vec(),
                })?;
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

/// Streams the entries of a tree, reading the blobs that follow in the same
/// pack together (a tree's blobs were written in order, so a run of them is
/// one ranged request instead of one per blob), holding at most
/// [`READ_AHEAD_BYTES`] of them besides the one being parsed.
pub struct TreeReader<'a> {
    repo: &'a Repo,
    index: &'a Index,
    blobs: Vec<BlobId>,
    next_blob: usize,
    /// Plaintexts of the blobs after `next_blob`, read ahead.
    ready: std::collections::VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    what: String,
}

impl<'a> TreeReader<'a> {
    pub fn new(repo: &'a Repo, index: &'a Index, tree: &[BlobId], what: String) -> Self {
        TreeReader {
            repo,
            index,
            blobs: tree.to_vec(),
            next_blob: 0,
            ready: Default::default(),
            buf: Vec::new(),
            pos: 0,
            what,
        }
    }

    /// The blobs from `next_blob` on that lie in the pack of `first`, one
    /// after the other, within [`READ_AHEAD_BYTES`]. A blob the index lacks
    /// ends the run (its read reports it).
    fn next_run(&self, first: BlobId) -> &[BlobId] {
        let rest = &self.blobs[self.next_blob..];
        let Some(pack) = self.index.get(&first).map(|l| l.pack) else {
            return &rest[..1];
        };
        let mut bytes = 0u64;
        let n = rest
            .iter()
            .take_while(|id| match self.index.get(id) {
                Some(l) if l.pack == pack => {
                    bytes += l.sealed_len as u64;
                    bytes <= READ_AHEAD_BYTES
                }
                _ => false,
            })
            .count();
        &rest[..n.max(1)]
    }

    pub async fn next_entry(&mut self) -> Result<Option<Entry>> {
        loop {
            if let Some(nl) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[self.pos..self.pos + nl];
                self.pos += nl + 1;
                let entry = Entry::from_json_line(line).map_err(|e| {
                    Error::corrupt(self.what.clone(), format!("bad tree entry: {e}"))
                })?;
                return Ok(Some(entry));
            }
            let Some(&id) = self.blobs.get(self.next_blob) else {
                if self.pos < self.buf.len() {
                    return Err(Error::corrupt(
                        self.what.clone(),
                        "tree ends in the middle of an entry",
                    ));
                }
                return Ok(None);
            };
            let blob = match self.ready.pop_front() {
                Some(blob) => blob,
                None => {
                    let run = self.next_run(id);
                    let mut blobs: std::collections::VecDeque<Vec<u8>> =
                        read_blobs(self.repo, self.index, run)
                            .await?
                            .into_iter()
                            .map(|(plain, _)| plain)
                            .collect();
                    let first = blobs.pop_front().ok_or_else(|| {
                        Error::Internal("a tree blob read returned nothing".into())
                    })?;
                    self.ready = blobs;
                    first
                }
            };
            self.next_blob += 1;
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.buf.extend_from_slice(&blob);
        }
    }
}

//! Writing and reading snapshot trees: JSON-lines entries, cut into tree blobs
//! by content-defined chunking (so unchanged parts of a tree deduplicate).

use crate::error::{Error, Result};
use crate::format::ids::BlobId;
use crate::format::pack::BlobKind;
use crate::format::tree::Entry;
use crate::keys::derive::EpochKeys;
use crate::pipeline::blobs::read_blob;
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

/// Streams the entries of a tree, one blob in memory at a time.
pub struct TreeReader<'a> {
    repo: &'a Repo,
    index: &'a Index,
    blobs: std::vec::IntoIter<BlobId>,
    buf: Vec<u8>,
    pos: usize,
    what: String,
}

impl<'a> TreeReader<'a> {
    pub fn new(repo: &'a Repo, index: &'a Index, tree: &[BlobId], what: String) -> Self {
        TreeReader {
            repo,
            index,
            blobs: Vec::from(tree).into_iter(),
            buf: Vec::new(),
            pos: 0,
            what,
        }
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
            let Some(id) = self.blobs.next() else {
                if self.pos < self.buf.len() {
                    return Err(Error::corrupt(
                        self.what.clone(),
                        "tree ends in the middle of an entry",
                    ));
                }
                return Ok(None);
            };
            let blob = read_blob(self.repo, self.index, &id).await?;
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.buf.extend_from_slice(&blob);
        }
    }
}

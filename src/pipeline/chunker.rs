//! Content-defined chunking (FastCDC 2020) over a stream, with the gear table
//! keyed per tenant epoch so chunk boundaries leak nothing about content.

use std::borrow::Cow;
use std::io::{self, Read};

use fastcdc::v2020::{Normalization, cut_gear, get_gear_with_seed, select_masks};

use crate::format::snapshot::ChunkerParams;

/// File content: about 512 KiB min, 1 MiB average, 8 MiB max (DESIGN.md).
pub const DATA_CHUNKS: ChunkerParams = ChunkerParams {
    min: 512 << 10,
    avg: 1 << 20,
    max: 8 << 20,
};
/// Tree streams: smaller chunks, so a small change rewrites little of a tree.
pub const TREE_CHUNKS: ChunkerParams = ChunkerParams {
    min: 16 << 10,
    avg: 64 << 10,
    max: 256 << 10,
};

pub struct Chunker {
    params: ChunkerParams,
    masks: (u64, u64),
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl Chunker {
    pub fn new(params: ChunkerParams, seed: u64) -> Self {
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Chunker {
            params,
            masks: select_masks(params.avg as usize, Normalization::Level1),
            gear,
            gear_ls,
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Length of the next chunk at the start of `data`. `data` must hold at
    /// least `max` bytes unless it is the end of the stream.
    pub fn cut(&self, data: &[u8]) -> usize {
        let p = self.params;
        let (ms, ml) = self.masks;
        let (_, n) = cut_gear(
            data,
            p.min as usize,
            p.avg as usize,
            p.max as usize,
            ms,
            ml,
            ms << 1,
            ml << 1,
            &self.gear,
            &self.gear_ls,
        );
        n.max(data.len().min(1))
    }

    /// Chunks everything `reader` yields, calling `emit` for each chunk in
    /// order. `buf` is scratch space reused across calls (grows to 2 × max).
    /// Returns the number of bytes read.
    pub fn chunk_reader<R: Read, E>(
        &self,
        mut reader: R,
        buf: &mut Vec<u8>,
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, ChunkError<E>> {
        let cap = 2 * self.params.max as usize;
        buf.clear();
        let mut total = 0u64;
        let mut eof = false;
        loop {
            // Fill up to capacity (or EOF); read_to_end grows the buffer without zero-filling it.
            if !eof && buf.len() < cap {
                let want = (cap - buf.len()) as u64;
                loop {
                    match (&mut reader).take(want).read_to_end(buf) {
                        Ok(n) => {
                            total += n as u64;
                            eof = (n as u64) < want;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(ChunkError::Read(e)),
                    }
                }
            }
            let mut pos = 0;
            while pos < buf.len() && (eof || buf.len() - pos >= self.params.max as usize) {
                let n = self.cut(&buf[pos..]);
                emit(&buf[pos..pos + n]).map_err(ChunkError::Emit)?;
                pos += n;
            }
            buf.drain(..pos);
            if eof && buf.is_empty() {
                return Ok(total);
            }
        }
    }
}

#[derive(Debug)]
pub enum ChunkError<E> {
    Read(io::Error),
    Emit(E),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunks(c: &Chunker, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        c.chunk_reader::<_, ()>(data, &mut buf, |ch| {
            out.push(ch.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    fn small() -> ChunkerParams {
        ChunkerParams {
            min: 256,
            avg: 1024,
            max: 4096,
        }
    }

    proptest! {
        #[test]
        fn chunks_concatenate_to_the_input_within_bounds(data in proptest::collection::vec(any::<u8>(), 0..40_000), seed in any::<u64>()) {
            let c = Chunker::new(small(), seed);
            let parts = chunks(&c, &data);
            prop_assert_eq!(parts.concat(), data.clone());
            for (i, p) in parts.iter().enumerate() {
                prop_assert!(p.len() <= 4096);
                prop_assert!(!p.is_empty());
                if i + 1 < parts.len() {
                    prop_assert!(p.len() >= 256);
                }
            }
        }

        #[test]
        fn boundaries_resynchronise_after_an_insertion(prefix in proptest::collection::vec(any::<u8>(), 1..100), seed in any::<u64>()) {
            // Content-defined: inserting bytes at the front changes only the first chunks.
            let mut data = vec![0u8; 60_000];
            let mut x = seed | 1;
            for b in &mut data {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *b = x as u8;
            }
            let c = Chunker::new(small(), seed);
            let before = chunks(&c, &data);
            let mut shifted = prefix.clone();
            shifted.extend_from_slice(&data);
            let after = chunks(&c, &shifted);
            let common = before.iter().rev().zip(after.iter().rev()).take_while(|(a, b)| a == b).count();
            // Resynchronisation is probabilistic (minimum-size skipping can miss an old cut
            // point a few times); most chunks must survive.
            prop_assert!(common * 10 >= before.len() * 7, "only {} of {} chunks survived", common, before.len());
        }
    }

    #[test]
    fn seed_changes_boundaries() {
        let mut data = vec![0u8; 200_000];
        crate::util::fill_random(&mut data);
        let a: Vec<usize> = chunks(&Chunker::new(small(), 1), &data)
            .iter()
            .map(Vec::len)
            .collect();
        let b: Vec<usize> = chunks(&Chunker::new(small(), 2), &data)
            .iter()
            .map(Vec::len)
            .collect();
        assert_ne!(a, b);
    }

    #[test]
    fn data_chunk_sizes_are_as_designed() {
        let mut data = vec![0u8; 24 << 20];
        crate::util::fill_random(&mut data);
        let parts = chunks(&Chunker::new(DATA_CHUNKS, 7), &data);
        let avg = data.len() / parts.len();
        assert!((600 << 10..2 << 20).contains(&avg), "average chunk {avg}");
        assert!(parts.iter().all(|p| p.len() <= 8 << 20));
    }
}

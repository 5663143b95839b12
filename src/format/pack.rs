//! Packs: many encrypted blobs in one object, with an encrypted directory at
//! the end so a pack can be checked and read without any index.
//!
//! ```text
//! header (84 bytes, kind 'P', object id = pack id)
//! blob 0 … blob n-1      sealed segments 0 … n-1, plaintext = frame
//! directory               sealed segment n, flagged last
//! trailer (8 bytes)       u32 BE n ‖ u32 BE sealed length of the directory
//! frame     = encoding u8 (0 raw, 1 zstd) ‖ payload
//! directory = u32 BE n ‖ n × (blob id[32] ‖ blob kind u8 ‖ offset u32 BE
//!             ‖ sealed length u32 BE ‖ raw length u32 BE)
//! ```
//!
//! Nonces count blob positions, so swapping, dropping or duplicating blobs
//! inside a pack fails authentication; the last flag on the directory makes
//! truncation detectable.

use super::ids::{BlobId, PackId};
use super::seal::{HEADER_LEN, ObjectKind, Opener, SealError, Sealer, TAG_LEN};
use crate::keys::derive::EpochKeys;

pub const TRAILER_LEN: usize = 8;
const DIR_ENTRY_LEN: usize = 32 + 1 + 4 + 4 + 4;
/// Packs stay below 4 GiB so offsets fit u32; the writer closes far earlier.
pub const MAX_PACK_LEN: u64 = u32::MAX as u64;

/// The shortest a pack can be that holds a blob ending at `blob_end` and at
/// least `blobs` blobs (one more than the highest segment number known): the
/// sealed directory of `blobs` entries and the trailer follow the last blob.
/// A listed pack shorter than this for what the index says is in it has lost
/// its end (and with it the directory every reader authenticates).
pub fn min_pack_len(blob_end: u64, blobs: u64) -> u64 {
    blob_end
        .saturating_add(sealed_directory_len(blobs))
        .saturating_add(TRAILER_LEN as u64)
}

/// The length of the sealed directory of a pack of `blobs` blobs: its
/// plaintext is the count (u32) and one entry a blob; sealed, it gains a tag.
pub fn sealed_directory_len(blobs: u64) -> u64 {
    (DIR_ENTRY_LEN as u64)
        .saturating_mul(blobs)
        .saturating_add((4 + TAG_LEN) as u64)
}

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of file content.
    Data = 0,
    /// A chunk of a snapshot's tree (JSON lines of entries).
    Tree = 1,
}

impl BlobKind {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// How a blob's payload is encoded inside its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

/// One blob's place in a pack, as listed in the pack directory and the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: BlobId,
    pub kind: BlobKind,
    /// Segment number inside the pack (the blob's nonce counter).
    pub segment: u32,
    /// Byte offset of the sealed blob from the start of the pack.
    pub offset: u32,
    pub sealed_len: u32,
    pub raw_len: u32,
}

/// Builds one pack in memory.
pub struct PackWriter {
    sealer: Sealer,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    raw_bytes: u64,
}

impl PackWriter {
    pub fn new(keys: &EpochKeys, capacity: usize) -> Self {
        Self::with_sealer(Sealer::new(keys, ObjectKind::Pack), capacity)
    }

    /// A pack with a given id (test vectors; an id must never repeat under one key).
    pub fn with_id(keys: &EpochKeys, id: PackId, capacity: usize) -> Self {
        Self::with_sealer(Sealer::with_id(keys, ObjectKind::Pack, id.0), capacity)
    }

    /// A pack built in `buf` (emptied first), a buffer reused from an
    /// earlier pack.
    pub fn in_buffer(keys: &EpochKeys, buf: Vec<u8>) -> Self {
        Self::build(Sealer::new(keys, ObjectKind::Pack), buf)
    }

    fn with_sealer(sealer: Sealer, capacity: usize) -> Self {
        Self::build(sealer, Vec::with_capacity(capacity))
    }

    fn build(sealer: Sealer, mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(sealer.header_bytes());
        PackWriter {
            sealer,
            buf,
            entries: Vec::new(),
            raw_bytes: 0,
        }
    }

    pub fn id(&self) -> PackId {
        PackId(*self.sealer.object_id())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// Appends a blob whose frame (encoding byte ‖ payload) is already built in
    /// `frame`; `frame` is encrypted in place and copied into the pack.
    pub fn add(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        raw_len: u32,
        frame: &mut Vec<u8>,
    ) -> PackEntry {
        let segment = self.entries.len() as u32;
        self.sealer.seal_segment(segment as u64, false, frame);
        let entry = PackEntry {
            id,
            kind,
            segment,
            offset: self.buf.len() as u32,
            sealed_len: frame.len() as u32,
            raw_len,
        };
        self.buf.extend_from_slice(frame);
        self.entries.push(entry);
        self.raw_bytes += raw_len as u64;
        entry
    }

    /// Seals the directory, appends the trailer, and returns the pack bytes
    /// with its entries.
    pub fn finish(mut self) -> FinishedPack {
        let n = self.entries.len() as u32;
        let mut dir = encode_directory(&self.entries);
        self.sealer.seal_segment(n as u64, true, &mut dir);
        self.buf.extend_from_slice(&dir);
        self.buf.extend_from_slice(&n.to_be_bytes());
        self.buf
            .extend_from_slice(&(dir.len() as u32).to_be_bytes());
        FinishedPack {
            id: PackId(*self.sealer.object_id()),
            bytes: self.buf,
            entries: self.entries,
            raw_bytes: self.raw_bytes,
        }
    }
}

/// A sealed pack, ready to upload.
pub struct FinishedPack {
    pub id: PackId,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
    pub raw_bytes: u64,
}

fn encode_directory(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * DIR_ENTRY_LEN + TAG_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.push(e.kind as u8);
        out.extend_from_slice(&e.offset.to_be_bytes());
        out.extend_from_slice(&e.sealed_len.to_be_bytes());
        out.extend_from_slice(&e.raw_len.to_be_bytes());
    }
    out
}

/// Parses a decrypted directory and checks it describes a well-formed pack of
/// `pack_len` bytes: blobs back to back from the header to the directory.
pub fn decode_directory(
    plain: &[u8],
    pack_len: u64,
    dir_sealed_len: u32,
) -> Result<Vec<PackEntry>, SealError> {
    let bad = |m: &str| SealError::Malformed(format!("pack directory: {m}"));
    if plain.len() < 4 {
        return Err(bad("too short"));
    }
    let n = u32::from_be_bytes(plain[..4].try_into().expect("4")) as usize;
    if plain.len() != 4 + n * DIR_ENTRY_LEN {
        return Err(bad("length does not match its count"));
    }
    let mut entries = Vec::with_capacity(n);
    let mut expected_offset = HEADER_LEN as u64;
    for (i, rec) in plain[4..].chunks_exact(DIR_ENTRY_LEN).enumerate() {
        let kind = BlobKind::from_byte(rec[32]).ok_or_else(|| bad("unknown blob kind"))?;
        let e = PackEntry {
            id: BlobId(rec[..32].try_into().expect("32")),
            kind,
            segment: i as u32,
            offset: u32::from_be_bytes(rec[33..37].try_into().expect("4")),
            sealed_len: u32::from_be_bytes(rec[37..41].try_into().expect("4")),
            raw_len: u32::from_be_bytes(rec[41..45].try_into().expect("4")),
        };
        if e.offset as u64 != expected_offset || (e.sealed_len as usize) < TAG_LEN + 1 {
            return Err(bad("blob offsets are not contiguous"));
        }
        expected_offset += e.sealed_len as u64;
        entries.push(e);
    }
    if expected_offset + dir_sealed_len as u64 + TRAILER_LEN as u64 != pack_len {
        return Err(bad("blobs and directory do not add up to the pack length"));
    }
    Ok(entries)
}

/// Opens a whole pack held in memory: verifies the header, the directory and
/// returns the entries. Blobs are then opened with [`open_blob`].
pub fn open_pack(
    keys: &EpochKeys,
    id: &PackId,
    pack: &[u8],
) -> Result<(Opener, Vec<PackEntry>), SealError> {
    let opener = Opener::new(keys, ObjectKind::Pack, Some(&id.0), pack)?;
    let trailer = &pack[pack.len().saturating_sub(TRAILER_LEN)..];
    let (n, dir) = directory_range(pack.len() as u64, trailer)?;
    let entries = open_directory(
        &opener,
        n,
        &pack[dir.start as usize..dir.end as usize],
        pack.len() as u64,
    )?;
    Ok((opener, entries))
}

/// From a pack's length and its last 8 bytes: the blob count and where the
/// sealed directory lies.
pub fn directory_range(
    pack_len: u64,
    trailer: &[u8],
) -> Result<(u32, std::ops::Range<u64>), SealError> {
    if pack_len < (HEADER_LEN + TAG_LEN + 4 + TRAILER_LEN) as u64 || trailer.len() != TRAILER_LEN {
        return Err(SealError::Truncated(format!(
            "{pack_len} bytes is too short for a pack"
        )));
    }
    let n = u32::from_be_bytes(trailer[..4].try_into().expect("4"));
    let dir_len = u32::from_be_bytes(trailer[4..].try_into().expect("4")) as u64;
    if dir_len + (TRAILER_LEN + HEADER_LEN) as u64 > pack_len {
        return Err(SealError::Truncated(
            "directory length exceeds the pack".into(),
        ));
    }
    // The trailer is not authenticated: before anyone reads the directory it
    // places, it must be as long as its count of blobs says and leave room
    // for them (each at least a tag and an encoding byte), so a forged count
    // or length costs no read and no memory.
    let blobs_min = u64::from(n) * (TAG_LEN as u64 + 1);
    if pack_len > MAX_PACK_LEN
        || dir_len != sealed_directory_len(u64::from(n))
        || HEADER_LEN as u64 + blobs_min + dir_len + TRAILER_LEN as u64 > pack_len
    {
        return Err(SealError::Malformed(format!(
            "pack trailer: a directory of {dir_len} bytes for {n} blobs does not fit a pack of {pack_len} bytes"
        )));
    }
    let end = pack_len - TRAILER_LEN as u64;
    Ok((n, end - dir_len..end))
}

/// Authenticates and parses a pack's sealed directory (segment `n`, last),
/// checking it accounts for exactly `pack_len` bytes.
pub fn open_directory(
    opener: &Opener,
    n: u32,
    sealed_dir: &[u8],
    pack_len: u64,
) -> Result<Vec<PackEntry>, SealError> {
    let mut dir = sealed_dir.to_vec();
    opener.open_segment(n as u64, true, &mut dir)?;
    let entries = decode_directory(&dir, pack_len, sealed_dir.len() as u32)?;
    if entries.len() != n as usize {
        return Err(SealError::Malformed(
            "pack trailer and directory disagree on the blob count".into(),
        ));
    }
    Ok(entries)
}
/// Decrypts one blob (`sealed` = its bytes at the entry's offset) and returns
/// its plaintext, verifying length and, when `keys` is given, its keyed id.
pub fn open_blob(
    opener: &Opener,
    keys: &EpochKeys,
    entry: &PackEntry,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut buf = sealed.to_vec();
    opener.open_segment(entry.segment as u64, false, &mut buf)?;
    let plain = decode_frame_owned(buf, entry.raw_len)?;
    check_id(keys, entry, &plain)?;
    Ok(plain)
}

/// [`open_blob`] for a reader of many blobs: decrypts `sealed` in place (the
/// caller's copy, no longer needed) and returns the plaintext: within
/// `sealed` for a blob stored uncompressed (no copy), else decompressed into
/// `plain`, whose allocation is reused from blob to blob.
pub fn open_blob_in<'a>(
    opener: &Opener,
    keys: &EpochKeys,
    entry: &PackEntry,
    sealed: &'a mut [u8],
    plain: &'a mut Vec<u8>,
) -> Result<&'a [u8], SealError> {
    let len = opener.open_segment_in(entry.segment as u64, false, sealed)?;
    let frame = &sealed[..len];
    let out: &[u8] = match frame.split_first() {
        None => return Err(SealError::Malformed("empty blob frame".into())),
        Some((0, raw)) => raw,
        Some((1, compressed)) => {
            plain.clear();
            // The buffer does not grow: a frame inflating past its room
            // fails here, one inflating past the stated length below.
            plain.reserve(entry.raw_len as usize);
            with_decompressor(|d| d.decompress_to_buffer(compressed, plain))
                .map_err(|e| SealError::Malformed(format!("zstd: {e}")))?;
            plain
        }
        Some((other, _)) => {
            return Err(SealError::Malformed(format!(
                "unknown blob encoding {other}"
            )));
        }
    };
    if out.len() != entry.raw_len as usize {
        return Err(SealError::Malformed(format!(
            "blob is {} bytes, expected {}",
            out.len(),
            entry.raw_len
        )));
    }
    check_id(keys, entry, out)?;
    Ok(out)
}

fn check_id(keys: &EpochKeys, entry: &PackEntry, plain: &[u8]) -> Result<(), SealError> {
    match keys.blob_id(plain) == entry.id.0 {
        true => Ok(()),
        false => Err(SealError::Malformed(format!(
            "blob {} does not hash to its id",
            entry.id.short()
        ))),
    }
}

/// Builds a frame for `plain`: zstd at `level` when that saves at least 1/32,
/// else raw. Returns the frame and its encoding.
pub fn encode_frame(plain: &[u8], level: i32, out: &mut Vec<u8>) -> Encoding {
    out.clear();
    out.reserve(plain.len() + 1 + TAG_LEN);
    out.push(Encoding::Zstd as u8);
    let limit = plain.len() - plain.len() / 32;
    if looks_compressible(plain) {
        out.resize(1 + limit, 0);
        if let Ok(n) = with_compressor(level, |c| c.compress_to_buffer(plain, &mut out[1..]))
            && n < limit
        {
            out.truncate(1 + n);
            return Encoding::Zstd;
        }
    }
    out.clear();
    out.push(Encoding::Raw as u8);
    out.extend_from_slice(plain);
    Encoding::Raw
}

/// Cheap incompressibility test: compress a 16 KiB sample at level 1; random
/// data (already compressed media, encrypted files) is then stored raw without
/// paying for a full compression attempt.
fn looks_compressible(plain: &[u8]) -> bool {
    const SAMPLE: usize = 16 * 1024;
    if plain.len() <= 2 * SAMPLE {
        return true;
    }
    let mid = plain.len() / 2;
    let sample = &plain[mid - SAMPLE / 2..mid + SAMPLE / 2];
    let mut out = [0u8; SAMPLE];
    match with_compressor(1, |c| c.compress_to_buffer(sample, &mut out[..])) {
        Ok(n) => n < SAMPLE - SAMPLE / 16,
        // Did not fit in SAMPLE bytes: incompressible.
        Err(_) => false,
    }
}

/// Runs `f` with this thread's zstd decompressor (a context per blob cost
/// more than decompressing a small file).
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::cell::RefCell;
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        f(d)
    })
}

/// Runs `f` with this thread's zstd compressor for `level`. A context is
/// reused across blobs: creating one per blob cost more than compressing a
/// small file.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::cell::RefCell;
    thread_local! {
        static COMPRESSORS: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(Vec::new()) };
    }
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let i = match all.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                all.push((level, zstd::bulk::Compressor::new(level)?));
                all.len() - 1
            }
        };
        f(&mut all[i].1)
    })
}

/// Decodes a frame back to the raw chunk of `raw_len` bytes.
pub fn decode_frame(frame: &[u8], raw_len: u32) -> Result<Vec<u8>, SealError> {
    decode_frame_owned(frame.to_vec(), raw_len)
}

/// [`decode_frame`] on a frame the caller no longer needs: a raw frame's
/// buffer becomes the plaintext without another allocation.
pub fn decode_frame_owned(mut frame: Vec<u8>, raw_len: u32) -> Result<Vec<u8>, SealError> {
    let Some(&enc) = frame.first() else {
        return Err(SealError::Malformed("empty blob frame".into()));
    };
    let plain = match enc {
        0 => {
            frame.remove(0);
            frame
        }
        1 => with_decompressor(|d| d.decompress(&frame[1..], raw_len as usize))
            .map_err(|e| SealError::Malformed(format!("zstd: {e}")))?,
        other => {
            return Err(SealError::Malformed(format!(
                "unknown blob encoding {other}"
            )));
        }
    };
    if plain.len() != raw_len as usize {
        return Err(SealError::Malformed(format!(
            "blob is {} bytes, expected {raw_len}",
            plain.len()
        )));
    }
    Ok(plain)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Keys and packs for the unit tests of every reader of packs.
    use super::*;
    use crate::keys::SecretKey;
    use crate::tenant::TenantId;

    /// The fixed data key of the tests.
    pub fn key() -> SecretKey {
        SecretKey::from_bytes([3; 32])
    }

    /// Epoch 1 of tenant acme, under [`key`].
    pub fn keys() -> EpochKeys {
        EpochKeys::new(TenantId::new("acme").unwrap(), 1, key())
    }

    /// A pack of `blobs`, each compressed when that pays.
    pub fn build(k: &EpochKeys, blobs: &[Vec<u8>]) -> FinishedPack {
        let mut w = PackWriter::new(k, 1 << 20);
        let mut frame = Vec::new();
        for b in blobs {
            encode_frame(b, 3, &mut frame);
            w.add(
                BlobId(k.blob_id(b)),
                BlobKind::Data,
                b.len() as u32,
                &mut frame,
            );
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{build, keys};
    use super::*;

    #[test]
    fn pack_round_trip_and_directory() {
        let k = keys();
        let blobs = vec![
            b"hello".repeat(1000),
            crate::util::random_bytes::<64>().to_vec(),
            vec![],
        ];
        let p = build(&k, &blobs);
        let (opener, entries) = open_pack(&k, &p.id, &p.bytes).unwrap();
        assert_eq!(entries, p.entries);
        for (e, b) in entries.iter().zip(&blobs) {
            let sealed = &p.bytes[e.offset as usize..(e.offset + e.sealed_len) as usize];
            assert_eq!(&open_blob(&opener, &k, e, sealed).unwrap(), b);
        }
        assert!(
            entries[0].sealed_len < 1000,
            "compressible blob was compressed"
        );
    }

    #[test]
    fn swapped_blobs_fail() {
        let k = keys();
        let p = build(&k, &[vec![1u8; 100], vec![2u8; 100]]);
        let (opener, entries) = open_pack(&k, &p.id, &p.bytes).unwrap();
        let second = &p.bytes
            [entries[1].offset as usize..(entries[1].offset + entries[1].sealed_len) as usize];
        // Blob 1's bytes presented as blob 0: its nonce differs, so it fails.
        assert!(matches!(
            open_blob(&opener, &k, &entries[0], second),
            Err(SealError::AuthFailed { segment: 0 })
        ));
    }

    #[test]
    fn min_pack_len_is_the_length_of_a_whole_pack() {
        let k = keys();
        for n in [1usize, 2, 7] {
            let blobs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 100 * (i + 1)]).collect();
            let p = build(&k, &blobs);
            let last = p.entries.last().unwrap();
            let end = u64::from(last.offset) + u64::from(last.sealed_len);
            assert_eq!(min_pack_len(end, n as u64), p.bytes.len() as u64, "{n}");
            // Knowing only an earlier blob gives a lower bound.
            let first = &p.entries[0];
            let first_end = u64::from(first.offset) + u64::from(first.sealed_len);
            assert!(min_pack_len(first_end, 1) <= p.bytes.len() as u64);
        }
        assert_eq!(min_pack_len(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn truncated_or_extended_pack_fails() {
        let k = keys();
        let p = build(&k, &[vec![1u8; 5000]]);
        assert!(open_pack(&k, &p.id, &p.bytes[..p.bytes.len() - 1]).is_err());
        let mut longer = p.bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(open_pack(&k, &p.id, &longer).is_err());
        assert!(
            open_pack(&k, &PackId::random(), &p.bytes).is_err(),
            "renamed pack"
        );
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut data = vec![0u8; 200_000];
        crate::util::fill_random(&mut data);
        let mut frame = Vec::new();
        assert_eq!(encode_frame(&data, 3, &mut frame), Encoding::Raw);
        assert_eq!(decode_frame(&frame, data.len() as u32).unwrap(), data);
        assert_eq!(
            encode_frame(&vec![b'a'; 200_000], 3, &mut frame),
            Encoding::Zstd
        );
    }
}

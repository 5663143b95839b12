//! The sealing primitive shared by every encrypted object (packs, index files,
//! snapshots): a fixed header with a key commitment, then AES-256-GCM segments
//! under a per-object key with counter nonces, in the manner of STREAM / the
//! C2SP chunked-encryption spec.
//!
//! ```text
//! header (84 bytes, clear, authenticated through the AAD and the key commitment)
//!   magic "CUSTOS" ‖ version u8 = 1 ‖ kind u8 ‖ epoch u32 BE ‖ tenant tag [8]
//!   ‖ object id [32] ‖ key commitment [32]
//! segment i: AES-256-GCM(seal key, nonce_i, AAD_i, plaintext_i) ‖ tag[16]
//!   nonce_i = 0x000000 ‖ i u64 BE ‖ last u8 (0x01 on the final segment, else 0x00)
//!   AAD_i   = "custos/v1/aad" ‖ header[0..52] ‖ u16 BE len(tenant) ‖ tenant ‖ i u64 BE ‖ last u8
//! seal key ‖ commitment = HKDF-SHA256(ikm = TDK, salt = object id,
//!   info = "custos/v1/seal" ‖ 0 ‖ tenant ‖ 0 ‖ epoch u32 BE ‖ kind)
//! ```
//!
//! One key per object, so nonces are a plain counter and no key ever comes near
//! the 2^32 random-nonce bound of NIST SP 800-38D. The commitment is checked
//! before any decryption because AES-GCM alone does not commit to its key.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use sha2::{Digest, Sha256};

use crate::keys::derive::EpochKeys;
use crate::tenant::TenantId;

pub const MAGIC: &[u8; 6] = b"CUSTOS";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 84;
pub const TAG_LEN: usize = 16;
/// Bytes of the header covered by the AAD (everything before the commitment).
const HEADER_AAD_LEN: usize = 52;
const AAD_LABEL: &[u8] = b"custos/v1/aad";

/// What a sealed object holds; part of its header, key derivation and AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    Pack = b'P',
    Index = b'I',
    Snapshot = b'S',
}

impl ObjectKind {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'P' => Some(ObjectKind::Pack),
            b'I' => Some(ObjectKind::Index),
            b'S' => Some(ObjectKind::Snapshot),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Pack => "pack",
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshot",
        }
    }
}

/// First 8 bytes of SHA-256("custos/v1/tenant-tag" ‖ tenant): lets a reader say
/// "this object belongs to another tenant" instead of just "corrupt".
pub fn tenant_tag(tenant: &TenantId) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"custos/v1/tenant-tag");
    h.update(tenant.as_str().as_bytes());
    let digest = h.finalize();
    digest[..8].try_into().expect("8 bytes")
}

/// Why a sealed object could not be opened. Callers add the object's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a custos object (bad magic)")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u8),
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("expected a {expected} object, found kind {found:#04x}")]
    WrongKind { expected: &'static str, found: u8 },
    #[error(
        "object id in the header does not match its name (renamed, copied or replayed under another name)"
    )]
    WrongObjectId,
    #[error("sealed for another tenant (object moved or copied across tenant prefixes)")]
    ForeignTenant,
    #[error("sealed for key epoch {found}, expected epoch {expected}")]
    WrongEpoch { found: u32, expected: u32 },
    #[error(
        "key commitment mismatch: the header was tampered with, or the object was sealed under another key"
    )]
    CommitmentMismatch,
    #[error(
        "authentication failed on segment {segment}: tampered, truncated, reordered or foreign data"
    )]
    AuthFailed { segment: u64 },
    #[error("malformed content: {0}")]
    Malformed(String),
}

impl SealError {
    /// Attaches the object name, giving the crate error with the right kind.
    pub fn at(self, object: impl Into<String>) -> crate::Error {
        let object = object.into();
        match self {
            SealError::ForeignTenant => crate::Error::Foreign {
                object,
                reason: self.to_string(),
            },
            _ => crate::Error::corrupt(object, self.to_string()),
        }
    }
}

/// The clear header of a sealed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: ObjectKind,
    pub epoch: u32,
    pub tenant_tag: [u8; 8],
    pub object_id: [u8; 32],
    pub commitment: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..6].copy_from_slice(MAGIC);
        out[6] = FORMAT_VERSION;
        out[7] = self.kind as u8;
        out[8..12].copy_from_slice(&self.epoch.to_be_bytes());
        out[12..20].copy_from_slice(&self.tenant_tag);
        out[20..52].copy_from_slice(&self.object_id);
        out[52..84].copy_from_slice(&self.commitment);
        out
    }

    /// Parses a header. Checks only syntax; [`Opener::new`] checks it belongs to us.
    pub fn decode(bytes: &[u8]) -> Result<Self, SealError> {
        if bytes.len() < HEADER_LEN {
            return Err(SealError::Truncated(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..6] != MAGIC {
            return Err(SealError::BadMagic);
        }
        if bytes[6] != FORMAT_VERSION {
            return Err(SealError::UnsupportedVersion(bytes[6]));
        }
        let kind = ObjectKind::from_byte(bytes[7]).ok_or(SealError::WrongKind {
            expected: "known",
            found: bytes[7],
        })?;
        Ok(Header {
            kind,
            epoch: u32::from_be_bytes(bytes[8..12].try_into().expect("4")),
            tenant_tag: bytes[12..20].try_into().expect("8"),
            object_id: bytes[20..52].try_into().expect("32"),
            commitment: bytes[52..84].try_into().expect("32"),
        })
    }

    /// Epoch stated by a header, before it is authenticated: used to pick the key.
    pub fn peek_epoch(bytes: &[u8]) -> Result<u32, SealError> {
        Header::decode(bytes).map(|h| h.epoch)
    }
}

/// Per-object cipher state, shared by [`Sealer`] and [`Opener`].
struct SegmentCipher {
    cipher: Aes256Gcm,
    aad_prefix: Vec<u8>,
}

impl SegmentCipher {
    fn new(keys: &EpochKeys, header_bytes: &[u8; HEADER_LEN], key: &[u8; 32]) -> Self {
        let tenant = keys.tenant().as_str().as_bytes();
        let mut aad_prefix =
            Vec::with_capacity(AAD_LABEL.len() + HEADER_AAD_LEN + 2 + tenant.len() + 9);
        aad_prefix.extend_from_slice(AAD_LABEL);
        aad_prefix.extend_from_slice(&header_bytes[..HEADER_AAD_LEN]);
        aad_prefix.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
        aad_prefix.extend_from_slice(tenant);
        SegmentCipher {
            cipher: Aes256Gcm::new_from_slice(key).expect("32-byte key"),
            aad_prefix,
        }
    }

    fn nonce_and_aad(&self, index: u64, last: bool) -> ([u8; 12], Vec<u8>) {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&index.to_be_bytes());
        nonce[11] = last as u8;
        let mut aad = Vec::with_capacity(self.aad_prefix.len() + 9);
        aad.extend_from_slice(&self.aad_prefix);
        aad.extend_from_slice(&index.to_be_bytes());
        aad.push(last as u8);
        (nonce, aad)
    }
}

/// Seals the segments of one new object.
pub struct Sealer {
    header: Header,
    header_bytes: [u8; HEADER_LEN],
    segments: SegmentCipher,
}

impl Sealer {
    /// A sealer for a new object with a fresh random id.
    pub fn new(keys: &EpochKeys, kind: ObjectKind) -> Self {
        Self::with_id(keys, kind, crate::util::random_bytes())
    }

    /// A sealer with a given id (test vectors; the id must never repeat for one key).
    pub fn with_id(keys: &EpochKeys, kind: ObjectKind, object_id: [u8; 32]) -> Self {
        let derived = keys.seal_keys(kind as u8, &object_id);
        let header = Header {
            kind,
            epoch: keys.epoch(),
            tenant_tag: tenant_tag(keys.tenant()),
            object_id,
            commitment: derived.commitment,
        };
        let header_bytes = header.encode();
        let segments = SegmentCipher::new(keys, &header_bytes, &derived.key);
        Sealer {
            header,
            header_bytes,
            segments,
        }
    }

    pub fn object_id(&self) -> &[u8; 32] {
        &self.header.object_id
    }

    pub fn header_bytes(&self) -> &[u8; HEADER_LEN] {
        &self.header_bytes
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) {
        let (nonce, aad) = self.segments.nonce_and_aad(index, last);
        let tag = self
            .segments
            .cipher
            .encrypt_inout_detached(&nonce.into(), &aad, buf.as_mut_slice().into())
            .expect("segment within AES-GCM limits");
        buf.extend_from_slice(&tag);
    }
}

/// Opens the segments of an existing object after checking its header.
pub struct Opener {
    header: Header,
    segments: SegmentCipher,
}

impl Opener {
    /// Checks the header against what the caller expects (kind, tenant, epoch key,
    /// and the object id its name states) and verifies the key commitment.
    pub fn new(
        keys: &EpochKeys,
        kind: ObjectKind,
        expected_id: Option<&[u8; 32]>,
        header_bytes: &[u8],
    ) -> Result<Self, SealError> {
        let header = Header::decode(header_bytes)?;
        if header.kind != kind {
            return Err(SealError::WrongKind {
                expected: kind.name(),
                found: header.kind as u8,
            });
        }
        if header.tenant_tag != tenant_tag(keys.tenant()) {
            return Err(SealError::ForeignTenant);
        }
        if header.epoch != keys.epoch() {
            return Err(SealError::WrongEpoch {
                found: header.epoch,
                expected: keys.epoch(),
            });
        }
        if let Some(id) = expected_id
            && *id != header.object_id
        {
            return Err(SealError::WrongObjectId);
        }
        let derived = keys.seal_keys(kind as u8, &header.object_id);
        if !constant_time_eq(&derived.commitment, &header.commitment) {
            return Err(SealError::CommitmentMismatch);
        }
        let encoded = header.encode();
        let segments = SegmentCipher::new(keys, &encoded, &derived.key);
        Ok(Opener { header, segments })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Decrypts `buf` (ciphertext ‖ tag) in place, leaving the plaintext.
    pub fn open_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), SealError> {
        let len = self.open_segment_in(index, last, buf)?;
        buf.truncate(len);
        Ok(())
    }

    /// Decrypts `buf` (ciphertext ‖ tag) in place; the plaintext is the
    /// returned length's first bytes.
    pub fn open_segment_in(
        &self,
        index: u64,
        last: bool,
        buf: &mut [u8],
    ) -> Result<usize, SealError> {
        let fail = SealError::AuthFailed { segment: index };
        let Some(split) = buf.len().checked_sub(TAG_LEN) else {
            return Err(fail);
        };
        let (text, tag) = buf.split_at_mut(split);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("16 bytes");
        let (nonce, aad) = self.segments.nonce_and_aad(index, last);
        self.segments
            .cipher
            .decrypt_inout_detached(&nonce.into(), &aad, text.into(), &tag.into())
            .map_err(|_| fail)?;
        Ok(split)
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Plaintext bytes per segment of a sealed stream (index files, snapshots).
pub const STREAM_SEGMENT: usize = 64 * 1024;

/// Seals a whole byte string as a stream object: header ‖ segments of
/// [`STREAM_SEGMENT`] plaintext bytes, the final one (possibly short or empty)
/// flagged last.
pub fn seal_stream(sealer: &Sealer, plaintext: &[u8]) -> Vec<u8> {
    let n_full = plaintext.len().saturating_sub(1) / STREAM_SEGMENT;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + (n_full + 1) * TAG_LEN);
    out.extend_from_slice(sealer.header_bytes());
    let mut buf = Vec::with_capacity(STREAM_SEGMENT + TAG_LEN);
    for (i, piece) in stream_pieces(plaintext).enumerate() {
        buf.clear();
        buf.extend_from_slice(piece.0);
        sealer.seal_segment(i as u64, piece.1, &mut buf);
        out.extend_from_slice(&buf);
    }
    out
}

/// Splits plaintext into stream segments: full segments, then a final one that
/// may be short, exactly full, or (for empty input only) empty.
fn stream_pieces(plaintext: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let count = plaintext.len().div_ceil(STREAM_SEGMENT).max(1);
    (0..count).map(move |i| {
        let start = i * STREAM_SEGMENT;
        let end = (start + STREAM_SEGMENT).min(plaintext.len());
        (&plaintext[start..end], i + 1 == count)
    })
}

/// Opens a stream object sealed by [`seal_stream`], returning its plaintext.
pub fn open_stream(opener: &Opener, object: &[u8]) -> Result<Vec<u8>, SealError> {
    let body = &object[HEADER_LEN.min(object.len())..];
    let seg_ct = STREAM_SEGMENT + TAG_LEN;
    if body.len() < TAG_LEN {
        return Err(SealError::Truncated("no final segment".into()));
    }
    let count = body.len().div_ceil(seg_ct);
    let mut out = Vec::with_capacity(body.len());
    let mut buf = Vec::with_capacity(seg_ct);
    for i in 0..count {
        let piece = &body[i * seg_ct..((i + 1) * seg_ct).min(body.len())];
        let last = i + 1 == count;
        if !last && piece.len() != seg_ct {
            return Err(SealError::Truncated(format!("segment {i} is short")));
        }
        buf.clear();
        buf.extend_from_slice(piece);
        opener.open_segment(i as u64, last, &mut buf)?;
        if last && buf.is_empty() && i > 0 {
            // Only an empty stream ends in an empty segment; anything else was cut.
            return Err(SealError::Truncated(
                "empty final segment after data".into(),
            ));
        }
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use proptest::prelude::*;

    fn keys(tenant: &str, epoch: u32, k: u8) -> EpochKeys {
        EpochKeys::new(
            TenantId::new(tenant).unwrap(),
            epoch,
            SecretKey::from_bytes([k; 32]),
        )
    }

    fn open(k: &EpochKeys, kind: ObjectKind, obj: &[u8]) -> Result<Vec<u8>, SealError> {
        let opener = Opener::new(k, kind, None, obj)?;
        open_stream(&opener, obj)
    }

    proptest! {
        #[test]
        fn stream_round_trips(data in proptest::collection::vec(any::<u8>(), 0..200_000)) {
            let k = keys("acme", 1, 1);
            let sealer = Sealer::new(&k, ObjectKind::Index);
            let obj = seal_stream(&sealer, &data);
            prop_assert_eq!(open(&k, ObjectKind::Index, &obj).unwrap(), data);
        }

        #[test]
        fn any_flipped_bit_is_detected(data in proptest::collection::vec(any::<u8>(), 1..140_000), pos in any::<usize>(), bit in 0u8..8) {
            let k = keys("acme", 1, 1);
            let mut obj = seal_stream(&Sealer::new(&k, ObjectKind::Snapshot), &data);
            let at = pos % obj.len();
            obj[at] ^= 1 << bit;
            prop_assert!(open(&k, ObjectKind::Snapshot, &obj).is_err());
        }
    }

    #[test]
    fn truncation_at_a_segment_boundary_is_detected() {
        let k = keys("acme", 1, 1);
        let data = vec![7u8; STREAM_SEGMENT * 3];
        let obj = seal_stream(&Sealer::new(&k, ObjectKind::Index), &data);
        let cut = &obj[..HEADER_LEN + 2 * (STREAM_SEGMENT + TAG_LEN)];
        assert!(matches!(
            open(&k, ObjectKind::Index, cut),
            Err(SealError::AuthFailed { .. })
        ));
        let cut = &obj[..HEADER_LEN];
        assert!(matches!(
            open(&k, ObjectKind::Index, cut),
            Err(SealError::Truncated(_))
        ));
    }

    #[test]
    fn foreign_tenant_epoch_kind_and_key_are_told_apart() {
        let a = keys("acme", 1, 1);
        let obj = seal_stream(&Sealer::new(&a, ObjectKind::Index), b"hello");
        assert_eq!(
            open(&keys("other", 1, 1), ObjectKind::Index, &obj),
            Err(SealError::ForeignTenant)
        );
        assert_eq!(
            open(&keys("acme", 2, 1), ObjectKind::Index, &obj),
            Err(SealError::WrongEpoch {
                found: 1,
                expected: 2
            })
        );
        assert!(matches!(
            open(&a, ObjectKind::Pack, &obj),
            Err(SealError::WrongKind { .. })
        ));
        // Same tenant and epoch, different TDK (another repository): the commitment says so.
        assert_eq!(
            open(&keys("acme", 1, 2), ObjectKind::Index, &obj),
            Err(SealError::CommitmentMismatch)
        );
        let opener = Opener::new(&a, ObjectKind::Index, Some(&[0u8; 32]), &obj);
        assert_eq!(opener.err(), Some(SealError::WrongObjectId));
    }

    #[test]
    fn segments_cannot_be_swapped() {
        let k = keys("acme", 1, 1);
        let data: Vec<u8> = (0..STREAM_SEGMENT * 2 + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut obj = seal_stream(&Sealer::new(&k, ObjectKind::Index), &data);
        let s = STREAM_SEGMENT + TAG_LEN;
        let (a, b) = (HEADER_LEN, HEADER_LEN + s);
        let first = obj[a..a + s].to_vec();
        let second = obj[b..b + s].to_vec();
        obj[a..a + s].copy_from_slice(&second);
        obj[b..b + s].copy_from_slice(&first);
        assert!(matches!(
            open(&k, ObjectKind::Index, &obj),
            Err(SealError::AuthFailed { segment: 0 })
        ));
    }
}

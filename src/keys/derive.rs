//! Working keys derived from a tenant data key (TDK) with HKDF-SHA256.
//!
//! Every derivation binds the tenant and the epoch in its `info`, so no two
//! tenants or epochs ever share a working key, even if a TDK were reused.
//! The exact byte strings are part of the format (docs/FORMAT.md §Keys).

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::secret::{KEY_LEN, SecretKey};
use crate::tenant::TenantId;

/// `info` = label ‖ 0x00 ‖ tenant ‖ 0x00 ‖ epoch (u32 big-endian) [‖ extra].
fn info(label: &[u8], tenant: &TenantId, epoch: u32, extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + tenant.as_str().len() + 6 + extra.len());
    out.extend_from_slice(label);
    out.push(0);
    out.extend_from_slice(tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(extra);
    out
}

/// The keys of one tenant epoch. Holds the TDK and its derived keys; all
/// zeroized on drop, none printed by `Debug`.
pub struct EpochKeys {
    tenant: TenantId,
    epoch: u32,
    tdk: SecretKey,
    chunk_id_key: SecretKey,
    chunker_seed: u64,
}

/// The two outputs of a seal-key derivation: the AES-256-GCM key and the key
/// commitment stored in the object header (checked before any decryption).
pub struct SealKeys {
    pub key: Zeroizing<[u8; KEY_LEN]>,
    pub commitment: [u8; KEY_LEN],
}

impl EpochKeys {
    pub fn new(tenant: TenantId, epoch: u32, tdk: SecretKey) -> Self {
        let hk = Hkdf::<Sha256>::new(None, tdk.expose());
        let mut chunk_id = Zeroizing::new([0u8; KEY_LEN]);
        hk.expand(
            &info(b"custos/v1/chunk-id", &tenant, epoch, &[]),
            chunk_id.as_mut(),
        )
        .expect("32 bytes is a valid HKDF-SHA256 length");
        let mut seed = [0u8; 8];
        hk.expand(
            &info(b"custos/v1/chunker-seed", &tenant, epoch, &[]),
            &mut seed,
        )
        .expect("8 bytes is a valid HKDF-SHA256 length");
        EpochKeys {
            tenant,
            epoch,
            tdk,
            chunk_id_key: SecretKey::from_bytes(*chunk_id),
            chunker_seed: u64::from_le_bytes(seed),
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn tdk(&self) -> &SecretKey {
        &self.tdk
    }

    /// Keyed BLAKE3 of a plaintext chunk: its blob id. Equal plaintexts give equal
    /// ids only within one tenant epoch, so deduplication never crosses them.
    pub fn blob_id(&self, plaintext: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(self.chunk_id_key.expose(), plaintext).as_bytes()
    }

    pub fn chunk_id_key(&self) -> &SecretKey {
        &self.chunk_id_key
    }

    /// Seed XORed into the FastCDC gear table, so chunk boundaries (and hence
    /// chunk sizes) do not reveal which known files a tenant stores.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// Key and commitment for one sealed object (pack, index, snapshot).
    /// salt = the object's random 32-byte id; info binds the object kind.
    pub fn seal_keys(&self, kind: u8, object_id: &[u8; 32]) -> SealKeys {
        let hk = Hkdf::<Sha256>::new(Some(object_id), self.tdk.expose());
        let mut okm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        hk.expand(
            &info(b"custos/v1/seal", &self.tenant, self.epoch, &[kind]),
            okm.as_mut(),
        )
        .expect("64 bytes is a valid HKDF-SHA256 length");
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&okm[..KEY_LEN]);
        let mut commitment = [0u8; KEY_LEN];
        commitment.copy_from_slice(&okm[KEY_LEN..]);
        SealKeys { key, commitment }
    }
}

impl std::fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKeys")
            .field("tenant", &self.tenant)
            .field("epoch", &self.epoch)
            .field("tdk_fingerprint", &self.tdk.fingerprint())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tenant: &str, epoch: u32) -> EpochKeys {
        EpochKeys::new(
            TenantId::new(tenant).unwrap(),
            epoch,
            SecretKey::from_bytes([7; 32]),
        )
    }

    #[test]
    fn derivations_are_bound_to_tenant_and_epoch() {
        let a1 = keys("a", 1);
        assert_eq!(a1.blob_id(b"x"), keys("a", 1).blob_id(b"x"));
        assert_ne!(a1.blob_id(b"x"), keys("b", 1).blob_id(b"x"));
        assert_ne!(a1.blob_id(b"x"), keys("a", 2).blob_id(b"x"));
        assert_ne!(a1.chunker_seed(), keys("a", 2).chunker_seed());
        let id = [9u8; 32];
        assert_ne!(
            a1.seal_keys(b'P', &id).commitment,
            keys("b", 1).seal_keys(b'P', &id).commitment
        );
        assert_ne!(
            a1.seal_keys(b'P', &id).commitment,
            a1.seal_keys(b'I', &id).commitment
        );
        assert_ne!(
            *a1.seal_keys(b'P', &id).key,
            *a1.seal_keys(b'P', &[8u8; 32]).key
        );
    }

    #[test]
    fn debug_hides_keys() {
        let shown = format!("{:?}", keys("a", 1));
        assert!(
            shown.contains("tdk_fingerprint") && !shown.contains("[7"),
            "{shown}"
        );
    }
}

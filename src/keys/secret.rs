//! Secret key material that zeroizes on drop and never prints itself.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Length of every symmetric key custos handles (AES-256, HKDF-SHA256 outputs).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret: a tenant data key (TDK) or a key derived from one.
///
/// The bytes live in a zeroizing buffer; `Debug` shows only a one-way
/// fingerprint, so a key can be logged by reference without leaking it.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SecretKey(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a zeroizing buffer. Callers should zeroize their own copy;
    /// the AWS SDK hands plaintext keys back in ordinary buffers.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let key = SecretKey::from_bytes(arr);
        let mut arr = arr;
        arr.zeroize();
        Some(key)
    }

    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        crate::util::fill_random(bytes.as_mut());
        SecretKey(bytes)
    }

    /// The raw bytes. Only key derivation and key wrapping may call this.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A short public identifier of this key: the first 8 bytes of
    /// HKDF-SHA256(ikm = key, info = "custos/v1/fingerprint"), in hex.
    /// One-way, so it is safe in logs, envelopes and certificates.
    pub fn fingerprint(&self) -> String {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, self.expose());
        let mut out = [0u8; 8];
        hk.expand(b"custos/v1/fingerprint", &mut out)
            .expect("8 bytes is a valid HKDF-SHA256 output length");
        hex::encode(out)
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time enough for equality of keys we already hold: fold all bytes.
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}
impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(fingerprint={})", self.fingerprint())
    }
}

/// The tenant data key of one key epoch, unwrapped. Exists only in memory, inside a job.
pub type DataKey = SecretKey;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = SecretKey::from_bytes([0xAB; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(shown.starts_with("SecretKey(fingerprint="));
    }

    #[test]
    fn fingerprint_is_stable_and_distinct() {
        let a = SecretKey::from_bytes([1; 32]);
        let b = SecretKey::from_bytes([2; 32]);
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(SecretKey::generate(), SecretKey::generate());
    }
}

//! 32-byte identifiers of blobs and stored objects, shown in lowercase hex.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn random() -> Self {
                $name(crate::util::random_bytes())
            }

            pub fn to_hex(&self) -> String {
                self.with_hex(str::to_owned)
            }

            /// Calls `f` with the id in hex, formatted on the stack: tree
            /// entries name every blob this way (`hex::encode` collects a
            /// `String` char by char).
            pub fn with_hex<T>(&self, f: impl FnOnce(&str) -> T) -> T {
                let mut buf = [0u8; 64];
                hex::encode_to_slice(self.0, &mut buf).expect("64 digits for 32 bytes");
                f(std::str::from_utf8(&buf).expect("hex digits are ASCII"))
            }

            /// Parses 64 lowercase hex digits.
            pub fn from_hex(s: &str) -> Option<Self> {
                if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
                    return None;
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).ok()?;
                Some($name(out))
            }

            /// The first 8 hex digits, for display.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.with_hex(|h| f.write_str(h))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.with_hex(|h| s.serialize_str(h))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Decoded from the string as the parser holds it: no copy per
                // id (a `Cow<str>` is always owned, one allocation each: 5% of
                // an incremental backup reading a parent tree of 2M files).
                struct Hex;
                impl serde::de::Visitor<'_> for Hex {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        $name::from_hex(s)
                            .ok_or_else(|| E::custom(concat!("invalid ", stringify!($name))))
                    }
                }
                d.deserialize_str(Hex)
            }
        }
    };
}

id_type!(
    /// Keyed BLAKE3 of a plaintext chunk under its epoch's chunk-id key.
    BlobId
);
id_type!(
    /// Random id of a pack; also its object name and its key-derivation salt.
    PackId
);
id_type!(
    /// Random id of an index file.
    IndexId
);
id_type!(
    /// Random id of a snapshot.
    SnapshotId
);
id_type!(
    /// Name of a key claim: SHA-256 of the key reference it claims
    /// (`crate::format::claim::claim_id`), so one key has one claim per tenant.
    ClaimId
);

/// Ids are uniformly random (or keyed-hash outputs), so their first 8 bytes
/// are already a good hash: no need to run SipHash over 32 bytes per lookup.
#[derive(Clone, Copy, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Derived Hash for [u8; 32] writes the bytes (no length prefix for arrays).
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = self.0.rotate_left(5) ^ n as u64;
    }
}

#[derive(Clone, Copy, Default)]
pub struct BuildIdHasher;

impl BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

pub type IdMap<K, V> = std::collections::HashMap<K, V, BuildIdHasher>;
pub type IdSet<K> = std::collections::HashSet<K, BuildIdHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_strictness() {
        let id = BlobId::random();
        assert_eq!(BlobId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(BlobId::from_hex("zz"), None);
        assert_eq!(BlobId::from_hex(&id.to_hex().to_uppercase()), None);
        assert_eq!(id.short().len(), 8);
    }
}

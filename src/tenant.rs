//! Tenant identifiers: the one piece of context every operation carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest tenant id: 1 leading character + 62 more, so ids fit DNS labels and S3 prefixes.
pub const MAX_TENANT_ID_LEN: usize = 63;

/// A validated tenant id: `[a-z0-9][a-z0-9-]{0,62}`.
///
/// Validation happens once, at the edge (CLI argument, policy file, stored
/// descriptor); everything past that takes a `TenantId`, so a path segment such
/// as `..` or `a/b` can never reach the store.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant id {input:?}: {reason} (expected [a-z0-9][a-z0-9-]{{0,62}})")]
pub struct InvalidTenantId {
    pub input: String,
    pub reason: &'static str,
}

impl TenantId {
    pub fn new(input: &str) -> Result<Self, InvalidTenantId> {
        let fail = |reason| {
            Err(InvalidTenantId {
                // Cap what we echo back: the input may be hostile or huge.
                input: input.chars().take(80).collect(),
                reason,
            })
        };
        let bytes = input.as_bytes();
        let Some(&first) = bytes.first() else {
            return fail("it is empty");
        };
        if input.len() > MAX_TENANT_ID_LEN {
            return fail("it is longer than 63 characters");
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return fail("it must start with a lowercase letter or a digit");
        }
        for &b in bytes {
            if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return fail(
                    "only lowercase ASCII letters, digits and '-' are allowed (no '/', '.', uppercase or unicode)",
                );
            }
        }
        Ok(TenantId(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::new(s)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for TenantId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TenantId::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in ["a", "acme", "0", "acme-2", "a-", &"a".repeat(63)] {
            assert_eq!(TenantId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_hostile_ids_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("../x", "start"),
            ("a/b", "only lowercase"),
            ("Acme", "start"),
            ("aCme", "only lowercase"),
            ("-a", "start"),
            ("a.b", "only lowercase"),
            ("ünï", "start"),
            ("aé", "only lowercase"),
            ("a b", "only lowercase"),
        ] {
            let err = TenantId::new(bad).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {}", err.reason);
            assert!(err.to_string().contains("invalid tenant id"));
        }
        let long = "a".repeat(64);
        assert!(TenantId::new(&long).unwrap_err().reason.contains("longer"));
    }

    #[test]
    fn deserialization_validates() {
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
        assert!(serde_json::from_str::<TenantId>("\"../etc\"").is_err());
    }
}

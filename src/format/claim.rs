//! Key claims, `tenants/<tenant>/keys/claims/<claim id>`: a random token
//! wrapped under a CMK with the context `{tenant, key-claim, 0}`.
//!
//! The descriptor is clear JSON that whoever can write the store can edit, so
//! it cannot say which keys a tenant owns. A claim can: only someone holding
//! the key can make a ciphertext that unwraps under it, and the wrap context
//! binds it to one tenant (a claim copied into another tenant's prefix does
//! not unwrap there). custos writes a claim whenever it binds a key to a
//! tenant (init, CMK replacement, an epoch shred's re-wrap) and keeps it when
//! the key stops wrapping envelopes, so a previous key stays provable until
//! it is destroyed. Not needed to restore (docs/FORMAT.md §3a).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::ids::ClaimId;
use crate::keys::{KeyPurpose, KeyRef, WrapContext, WrappedKey};
use crate::tenant::TenantId;

pub const CLAIM_FORMAT: &str = "custos-key-claim/1";
const CLAIM_ID_LABEL: &[u8] = b"custos/v1/key-claim";

/// The claim id of a key: SHA-256("custos/v1/key-claim" ‖ 0x00 ‖ key reference).
/// Deterministic, so binding a key twice finds the claim it wrote before.
pub fn claim_id(key: &KeyRef) -> ClaimId {
    let mut h = Sha256::new();
    h.update(CLAIM_ID_LABEL);
    h.update([0u8]);
    h.update(key.to_string().as_bytes());
    ClaimId(h.finalize().into())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyClaim {
    pub format: String,
    pub tenant: TenantId,
    pub purpose: KeyPurpose,
    /// The key claimed, as custos named it when binding it.
    pub key: KeyRef,
    pub created_at: DateTime<Utc>,
    /// Why the key was bound (`tenant-init`, `replace-cmk`, …): informational.
    pub reason: String,
    /// The token, wrapped under `key` with [`WrapContext::claim`].
    pub wrapped: WrappedKey,
    /// Fingerprint of the token, checked after unwrapping.
    pub fingerprint: String,
}

impl KeyClaim {
    pub fn new(
        tenant: &TenantId,
        key: KeyRef,
        reason: &str,
        wrapped: WrappedKey,
        fingerprint: String,
    ) -> Self {
        KeyClaim {
            format: CLAIM_FORMAT.into(),
            tenant: tenant.clone(),
            purpose: KeyPurpose::KeyClaim,
            key,
            created_at: Utc::now(),
            reason: reason.to_owned(),
            wrapped,
            fingerprint,
        }
    }

    /// The context the token is wrapped under. Taken from the tenant whose
    /// prefix holds the claim, never from the claim's own fields, which are
    /// unauthenticated.
    pub fn context_for(tenant: &TenantId) -> WrapContext {
        WrapContext::claim(tenant)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let c: KeyClaim = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if c.format != CLAIM_FORMAT {
            return Err(format!("unsupported key claim format {:?}", c.format));
        }
        if c.purpose != KeyPurpose::KeyClaim {
            return Err(format!(
                "a key claim's purpose is key-claim, not {:?}",
                c.purpose.as_str()
            ));
        }
        Ok(c)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("claims serialise");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_ids_are_per_key_and_stable() {
        let a = KeyRef::local("alpha").unwrap();
        let b = KeyRef::local("beta").unwrap();
        assert_eq!(claim_id(&a), claim_id(&a));
        assert_ne!(claim_id(&a), claim_id(&b));
        // Pinned: the id is part of the format (docs/FORMAT.md §3a).
        let mut h = Sha256::new();
        h.update(b"custos/v1/key-claim\0local:alpha");
        assert_eq!(claim_id(&a).0, <[u8; 32]>::from(h.finalize()));
    }

    #[test]
    fn parse_refuses_other_formats_and_purposes() {
        let t = TenantId::new("alpha").unwrap();
        let k = KeyRef::local("alpha").unwrap();
        let wrapped = WrappedKey {
            key_id: "local:alpha".into(),
            key_version: Some("1".into()),
            ciphertext: vec![0; 64],
        };
        let c = KeyClaim::new(&t, k, "tenant-init", wrapped, "00".into());
        assert_eq!(KeyClaim::parse(&c.to_json()).unwrap(), c);
        let json = String::from_utf8(c.to_json()).unwrap();
        let other = json.replace("\"key-claim\"", "\"tenant-data-key\"");
        assert!(KeyClaim::parse(other.as_bytes()).is_err());
        let other = json.replace(CLAIM_FORMAT, "custos-key-claim/9");
        assert!(KeyClaim::parse(other.as_bytes()).is_err());
        assert!(KeyClaim::parse(b"not json").is_err());
    }
}

//! Key envelopes, `tenants/<tenant>/keys/<epoch>`: one tenant data key (TDK)
//! wrapped by the tenant's CMK, as JSON. Useless without the CMK, so copies of
//! an envelope (object versions, backups) cannot defeat shredding.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyPurpose, KeyRef, WrapContext, WrappedKey};
use crate::tenant::TenantId;

pub const ENVELOPE_FORMAT: &str = "custos-envelope/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub format: String,
    pub tenant: TenantId,
    pub epoch: u32,
    pub purpose: KeyPurpose,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrapped_at: Option<DateTime<Utc>>,
    /// The CMK reference the data key is wrapped under.
    pub key: KeyRef,
    pub wrapped: WrappedKey,
    /// One-way fingerprint of the data key (see `SecretKey::fingerprint`), to
    /// confirm after unwrapping that this is the key the data was sealed with.
    pub fingerprint: String,
}

impl Envelope {
    pub fn context(&self) -> WrapContext {
        WrapContext {
            tenant: self.tenant.clone(),
            purpose: self.purpose,
            epoch: self.epoch,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let e: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if e.format != ENVELOPE_FORMAT {
            return Err(format!("unsupported envelope format {:?}", e.format));
        }
        // The purpose is part of the wrap context: an envelope claiming
        // another purpose (a key claim's token copied here) is not a data key.
        if e.purpose != KeyPurpose::TenantDataKey {
            return Err(format!(
                "an envelope holds a tenant data key, not a {:?}",
                e.purpose.as_str()
            ));
        }
        Ok(e)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("envelopes serialise");
        v.push(b'\n');
        v
    }

    pub fn new(
        tenant: &TenantId,
        epoch: u32,
        key: KeyRef,
        wrapped: WrappedKey,
        fingerprint: String,
    ) -> Self {
        Envelope {
            format: ENVELOPE_FORMAT.into(),
            tenant: tenant.clone(),
            epoch,
            purpose: KeyPurpose::TenantDataKey,
            created_at: Utc::now(),
            rewrapped_at: None,
            key,
            wrapped,
            fingerprint,
        }
    }
}

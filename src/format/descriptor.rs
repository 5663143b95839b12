//! The tenant descriptor, `tenants/<tenant>/tenant.json`: clear JSON, readable
//! without any key, so the lifecycle fence (shredding, shredded) holds even
//! when keys are gone. Each change bumps `generation`; custos remembers the
//! highest generation it has seen (state dir), so a replayed older descriptor
//! is detected.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::shred::ShredProgress;
use crate::keys::KeyRef;
use crate::tenant::TenantId;

pub const DESCRIPTOR_FORMAT: &str = "custos-tenant/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Active,
    /// Fenced: no backup, restore or new data key may start.
    Shredding,
    Shredded,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Active => "active",
            Lifecycle::Shredding => "shredding",
            Lifecycle::Shredded => "shredded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochState {
    /// Current: new data is written under it.
    Active,
    /// Superseded: still read, no longer written.
    Retired,
    /// Its data key is destroyed; its data is unreadable.
    Shredded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: u32,
    pub created_at: DateTime<Utc>,
    pub state: EpochState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shredded_at: Option<DateTime<Utc>>,
    /// The deletion certificate of the epoch's shred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub format: String,
    pub tenant: TenantId,
    pub state: Lifecycle,
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The CMK that wraps the data keys.
    pub key: KeyRef,
    /// Set while `rotate --replace-cmk` moves envelopes to this key; a re-run
    /// finishes the move. Cleared (and `key` updated) once every envelope moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_key: Option<KeyRef>,
    /// Keys that wrapped this tenant's data keys before, newest last.
    #[serde(default)]
    pub previous_keys: Vec<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmk_rotated_at: Option<DateTime<Utc>>,
    pub current_epoch: u32,
    pub epochs: Vec<EpochRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shredding: Option<ShredState>,
    /// An epoch shred in progress (`custos shred --epoch`); cleared when certified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_shred: Option<EpochShredState>,
}

/// Lifecycle details once shredding has begun.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShredState {
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub reason: String,
    pub requested_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// Step records of the shred, so that a re-run resumes (see `format::shred`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ShredProgress>,
}

/// An epoch shred in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochShredState {
    pub epoch: u32,
    /// The fresh key the remaining epochs move to (`--rewrap`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrap_to: Option<KeyRef>,
    pub shred: ShredState,
}

impl Descriptor {
    pub fn new(tenant: TenantId, key: KeyRef, now: DateTime<Utc>) -> Self {
        Descriptor {
            format: DESCRIPTOR_FORMAT.into(),
            tenant,
            state: Lifecycle::Active,
            generation: 1,
            created_at: now,
            updated_at: now,
            key,
            pending_key: None,
            previous_keys: Vec::new(),
            cmk_rotated_at: None,
            current_epoch: 1,
            epochs: vec![EpochRecord {
                epoch: 1,
                created_at: now,
                state: EpochState::Active,
                retired_at: None,
                shredded_at: None,
                certificate_id: None,
            }],
            shredding: None,
            epoch_shred: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let d: Descriptor = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if d.format != DESCRIPTOR_FORMAT {
            return Err(format!("unsupported descriptor format {:?}", d.format));
        }
        if !d.epochs.iter().any(|e| e.epoch == d.current_epoch) {
            return Err(format!(
                "current epoch {} is not among the epochs",
                d.current_epoch
            ));
        }
        Ok(d)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("descriptors serialise");
        v.push(b'\n');
        v
    }

    pub fn epoch(&self, epoch: u32) -> Option<&EpochRecord> {
        self.epochs.iter().find(|e| e.epoch == epoch)
    }

    /// Epochs whose data keys still exist.
    pub fn live_epochs(&self) -> impl Iterator<Item = &EpochRecord> {
        self.epochs
            .iter()
            .filter(|e| e.state != EpochState::Shredded)
    }
}

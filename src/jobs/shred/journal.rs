//! The journal of a shred: where its state lives in the descriptor
//! ([`Slot`]), the audit records of its steps (`shred.<step>.begin` /
//! `.end`) and its crash points (named as [`super::hook`] lists them).

use crate::audit::Receipt;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, ShredState};
use crate::format::shred::ShredProgress;
use crate::repo::Repo;
use crate::tenant::TenantId;

use super::hook;

/// Where a shred's state lives in the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Tenant,
    Epoch,
}

impl Slot {
    pub(super) fn hook_scope(self) -> &'static str {
        match self {
            Slot::Tenant => "shred",
            Slot::Epoch => "shred-epoch",
        }
    }

    pub(super) fn state(self, d: &Descriptor) -> Option<&ShredState> {
        match self {
            Slot::Tenant => d.shredding.as_ref(),
            Slot::Epoch => d.epoch_shred.as_ref().map(|e| &e.shred),
        }
    }

    pub(super) fn state_mut(self, d: &mut Descriptor) -> Option<&mut ShredState> {
        match self {
            Slot::Tenant => d.shredding.as_mut(),
            Slot::Epoch => d.epoch_shred.as_mut().map(|e| &mut e.shred),
        }
    }

    pub(super) fn progress(self, d: &Descriptor) -> Result<&ShredProgress> {
        self.state(d)
            .and_then(|s| s.progress.as_ref())
            .ok_or_else(|| Error::Internal("shred progress missing from the descriptor".into()))
    }
}

/// Applies `f` to the shred's progress in the descriptor (conditional write).
pub(super) async fn save(
    repo: &mut Repo,
    slot: Slot,
    f: impl FnOnce(&mut ShredProgress),
) -> Result<()> {
    slot.progress(repo.descriptor())?;
    repo.update_descriptor(|d| {
        if let Some(p) = slot.state_mut(d).and_then(|s| s.progress.as_mut()) {
            f(p);
        }
    })
    .await
}

/// Audit records of one shred's steps, and its crash points.
pub(super) struct Journal {
    ctx: Context,
    tenant: TenantId,
    epoch: Option<u32>,
    pub(super) certificate_id: String,
    slot: Slot,
}

impl Journal {
    pub(super) fn new(repo: &Repo, slot: Slot, epoch: Option<u32>) -> Result<Self> {
        let id = slot
            .state(repo.descriptor())
            .and_then(|s| s.certificate_id.clone())
            .ok_or_else(|| Error::Internal("shred without a certificate id".into()))?;
        Ok(Journal {
            ctx: repo.context().clone(),
            tenant: repo.tenant().clone(),
            epoch,
            certificate_id: id,
            slot,
        })
    }

    async fn record(&self, step: &str, phase: &str, details: serde_json::Value) -> Result<Receipt> {
        self.event(&format!("shred.{step}.{phase}"), details).await
    }

    /// Records `event` of this shred (its certificate id and epoch added).
    pub(super) async fn event(&self, event: &str, details: serde_json::Value) -> Result<Receipt> {
        let mut details = details;
        if let serde_json::Value::Object(m) = &mut details {
            m.insert("certificate_id".into(), self.certificate_id.clone().into());
            if let Some(e) = self.epoch {
                m.insert("epoch".into(), e.into());
            }
        }
        self.ctx
            .record(event, Some(&self.tenant), details)
            .await?
            .ok_or_else(|| Error::Internal("no audit log".into()))
    }

    pub(super) async fn begin(&self, step: &str, details: serde_json::Value) -> Result<Receipt> {
        tracing::info!(event = "shred.step", tenant = %self.tenant, epoch = self.epoch, step, phase = "begin", "shred of {}: {step}", self.tenant);
        self.record(step, "begin", details).await
    }

    pub(super) async fn end(&self, step: &str, details: serde_json::Value) -> Result<Receipt> {
        let r = self.record(step, "end", details).await?;
        tracing::info!(event = "shred.step", tenant = %self.tenant, epoch = self.epoch, step, phase = "end", audit_seq = r.seq, "shred of {}: {step} done", self.tenant);
        Ok(r)
    }

    pub(super) fn crash(&self, point: &str) {
        hook::crash_point(self.slot.hook_scope(), point);
    }
}

//! `shred --dry-run`: what a shred would do now, decided as the shred decides
//! it (the same refusals, the same key verdicts), with nothing fenced,
//! destroyed or deleted. The shred itself lists its scope again after its
//! fence, and records that scope before anything is destroyed.

use serde::Serialize;

use super::scope::{self, ScopeObject};
use crate::format::shred::{KeyRole, ShredStep};
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::repo::ownership::{KeyVerdict, Verdict};
use crate::store::tenant::Listed;
use crate::tenant::TenantId;

/// What a shred would do now.
#[derive(Debug, Clone, Serialize)]
pub struct ShredPreview {
    pub tenant: TenantId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    pub dry_run: bool,
    pub state: PreviewState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumes_after: Option<ShredStep>,
    /// `done`: the certificate the descriptor names (unverified here:
    /// `custos certificate get` and `certificate verify` check it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// The keys the shred ends, and what it would do to each.
    pub keys: Vec<PlannedKey>,
    /// An epoch shred with a re-wrap: the key the other epochs would move to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrap_to: Option<KeyRef>,
    /// The objects in scope now, their bytes and Merkle root (`scope.rs`).
    pub objects: usize,
    pub bytes: u64,
    pub scope_root: String,
}

/// Where the shred stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewState {
    /// Not begun: a run starts it.
    Start,
    /// Interrupted: a run resumes it.
    Resume,
    /// Shredded before: a run prints its certificate again.
    Done,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedKey {
    pub key: KeyRef,
    pub role: KeyRole,
    pub action: KeyFate,
}

/// What the shred would do to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFate {
    /// Proven the tenant's and no one else's: destroyed.
    Destroy,
    /// The provider already shows it destroyed, or does not know it.
    AlreadyGone,
    /// Unproven, and named by `--skip-unproven-key`: not touched.
    LeaveUntouched,
}

impl ShredPreview {
    pub(super) fn new(repo: &Repo, epoch: Option<u32>) -> Self {
        ShredPreview {
            tenant: repo.tenant().clone(),
            epoch,
            dry_run: true,
            state: PreviewState::Start,
            resumes_after: None,
            certificate_id: None,
            keys: Vec::new(),
            rewrap_to: None,
            objects: 0,
            bytes: 0,
            scope_root: hex::encode(scope::merkle_root(&[])),
        }
    }

    pub(super) fn resume(&mut self, after: Option<ShredStep>) {
        self.state = PreviewState::Resume;
        self.resumes_after = after;
    }

    pub(super) fn done(&mut self, certificate_id: Option<String>) {
        self.state = PreviewState::Done;
        self.certificate_id = certificate_id;
    }

    /// The verdicts the shred reached on the keys it would end.
    pub(super) fn keys(&mut self, verdicts: Vec<KeyVerdict>) {
        self.keys = verdicts
            .into_iter()
            .map(|v| PlannedKey {
                key: v.key,
                role: v.role,
                action: match v.verdict {
                    Verdict::Destroy { .. } => KeyFate::Destroy,
                    Verdict::AlreadyGone { .. } => KeyFate::AlreadyGone,
                    Verdict::Skip { .. } => KeyFate::LeaveUntouched,
                },
            })
            .collect();
    }

    pub(super) fn scope(&mut self, listed: &[Listed]) {
        let objects: Vec<ScopeObject> = listed
            .iter()
            .map(|l| ScopeObject::from_listed(&self.tenant, l))
            .collect();
        self.objects = objects.len();
        self.bytes = objects.iter().map(|o| o.size).sum();
        self.scope_root = hex::encode(scope::merkle_root(&objects));
    }
}

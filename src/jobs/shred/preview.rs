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
    /// `start`, `resume` (an interrupted shred) or `done` (shredded before).
    pub state: &'static str,
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

#[derive(Debug, Clone, Serialize)]
pub struct PlannedKey {
    pub key: KeyRef,
    pub role: KeyRole,
    /// `destroy`, `already_gone` (nothing to do) or `leave_untouched`
    /// (unproven, and named by --skip-unproven-key).
    pub action: &'static str,
}

impl ShredPreview {
    pub(super) fn new(repo: &Repo, epoch: Option<u32>) -> Self {
        ShredPreview {
            tenant: repo.tenant().clone(),
            epoch,
            dry_run: true,
            state: "start",
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
        self.state = "resume";
        self.resumes_after = after;
    }

    pub(super) fn done(&mut self, certificate_id: Option<String>) {
        self.state = "done";
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
                    Verdict::Destroy { .. } => "destroy",
                    Verdict::AlreadyGone { .. } => "already_gone",
                    Verdict::Skip => "leave_untouched",
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

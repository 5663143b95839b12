//! What a rotation will do, decided from the descriptor, the envelopes and
//! the keys' states before anything is written: `--dry-run` prints its
//! [`RotatePlan::preview`], [`super::execute`] carries it out.
//!
//! Every check that can refuse a rotation (the key's state, a new key's
//! residency and bindability, a test wrap under it, a move already under way
//! to another key) runs here, so a dry run refuses what the rotation would.

use serde::Serialize;

use super::{EnvelopeChange, RotateAction, RotateReport, envelopes, unusable};
use crate::error::{Error, Result};
use crate::keys::{DataKey, KeyError, KeyRef, WrapContext};
use crate::repo::Repo;
use crate::repo::ownership::{self, Depth};
use crate::store::ObjectName;

/// One write of a rotation, in the order the executor makes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The provider makes new material for `key`; the descriptor records
    /// `cmk_rotated_at`, which marks the envelopes still to re-wrap.
    NewMaterial { key: KeyRef },
    /// The tenant's claim on a key it has not used before, written before
    /// the descriptor names the key.
    Claim { key: KeyRef },
    /// The descriptor names `key` as the one the envelopes move to.
    MarkPending { key: KeyRef },
    /// The envelope of `epoch` re-wrapped from `from` to `to`'s newest material.
    Rewrap {
        epoch: u32,
        from: KeyRef,
        to: KeyRef,
    },
    /// The descriptor names `to` as the tenant's key and keeps `from` among
    /// its previous keys.
    SwitchKey { from: KeyRef, to: KeyRef },
    /// Once every envelope verifies under the new key, `key` is scheduled for
    /// deletion after `days`, if it is proven the tenant's and no one else's.
    ScheduleDeletion { key: KeyRef, days: u32 },
    /// The envelope of `epoch` is created under `key` (create-only), then the
    /// descriptor makes `epoch` current and retires the current one.
    NewEpoch { epoch: u32, key: KeyRef },
}

/// A rotation decided but not yet carried out.
#[derive(Debug)]
pub struct RotatePlan {
    pub(super) steps: Vec<Step>,
    /// The report as far as planning knows it: keys, versions, epochs, the
    /// envelopes to re-wrap.
    pub(super) report: RotateReport,
}

impl RotatePlan {
    /// The report of a dry run: what the rotation would do now.
    pub fn preview(self) -> RotateReport {
        RotateReport {
            dry_run: true,
            steps: self.steps,
            ..self.report
        }
    }
}

/// Plans `action` for the tenant of `repo`, whose current key the caller
/// has proven the tenant's. Writes nothing.
pub(super) async fn plan(repo: &Repo, action: &RotateAction) -> Result<RotatePlan> {
    let d = repo.descriptor();
    if let Some(p) = &d.pending_key {
        let same = matches!(
            action,
            RotateAction::ReplaceCmk { new_key, .. } | RotateAction::FinishReplace { new_key } if new_key == p
        );
        if !same {
            return Err(Error::InvalidArgument(format!(
                "tenant {} is moving from key {} to {p} (an interrupted `rotate --replace-cmk`): \
                 finish it first with `custos rotate {} --replace-cmk {p}`",
                d.tenant, d.key, d.tenant
            )));
        }
    }
    let mut p = Planner {
        repo,
        plan: RotatePlan {
            steps: Vec::new(),
            report: RotateReport::new(d, action.as_str()),
        },
    };
    match action {
        RotateAction::Cmk => p.cmk().await?,
        RotateAction::ReplaceCmk {
            new_key,
            schedule_old_key_deletion,
        } => p.replace(new_key, *schedule_old_key_deletion).await?,
        RotateAction::NewEpoch => p.new_epoch().await?,
        // Nothing pending any more (finished, or dropped as unproven): nothing to do.
        RotateAction::FinishReplace { new_key } => {
            if d.pending_key.as_ref() == Some(new_key) {
                p.replace(new_key, None).await?
            }
        }
    }
    Ok(p.plan)
}

struct Planner<'a> {
    repo: &'a Repo,
    plan: RotatePlan,
}

impl Planner<'_> {
    /// Plans the re-wrap of the envelope of `epoch` (as it is now) under `to`.
    fn rewrap(&mut self, epoch: u32, from: &KeyRef, version: Option<String>, to: &KeyRef) {
        self.plan.steps.push(Step::Rewrap {
            epoch,
            from: from.clone(),
            to: to.clone(),
        });
        self.plan.report.envelopes.push(EnvelopeChange {
            epoch,
            key_before: from.clone(),
            key_after: to.clone(),
            version_before: version,
            version_after: None,
            bytes_written: 0,
        });
    }

    async fn cmk(&mut self) -> Result<()> {
        let repo = self.repo;
        let key = repo.descriptor().key.clone();
        let before = repo.context().keys.key(&key)?.describe().await?;
        if !before.state.is_usable() {
            return Err(unusable(&key, &before));
        }
        let report = &mut self.plan.report;
        report.key_version_before = before.current_version.clone();
        report.key_version_after = before.current_version;
        // A run interrupted after the provider rotated left some envelope not
        // re-wrapped since: finish it without rotating the key once more.
        let marker = repo.descriptor().cmk_rotated_at;
        let mut all = Vec::new();
        let mut unfinished = Vec::new();
        for epoch in envelopes::epochs(repo).await? {
            let (env, _) = envelopes::read(repo, epoch).await?;
            let done_at = env.rewrapped_at.unwrap_or(env.created_at);
            let entry = (epoch, env.key.clone(), env.wrapped.key_version.clone());
            if marker.is_none_or(|m| done_at < m) || env.key != key {
                unfinished.push(entry.clone());
            }
            all.push(entry);
        }
        let todo = if marker.is_some() && !unfinished.is_empty() {
            self.plan.report.resumed = true;
            unfinished
        } else {
            self.plan.steps.push(Step::NewMaterial { key: key.clone() });
            all
        };
        for (epoch, from, version) in todo {
            self.rewrap(epoch, &from, version, &key);
        }
        Ok(())
    }

    async fn replace(
        &mut self,
        new_key: &KeyRef,
        schedule_old_key_deletion: Option<u32>,
    ) -> Result<()> {
        let repo = self.repo;
        let d = repo.descriptor();
        let (ctx, store) = (repo.context(), repo.store());
        self.plan.report.key_after = new_key.clone();
        let old = if &d.key == new_key {
            // Done before (re-run): the old key is the last previous one.
            d.previous_keys.last().cloned()
        } else {
            Some(d.key.clone())
        };
        self.plan.report.key_before = old.clone().unwrap_or_else(|| d.key.clone());
        // A new key for this tenant: refused if any other tenant uses it
        // (every other tenant's objects are tried under it) before custos
        // uses it at all, then claimed before the descriptor names it, so a
        // pending key is always provable and one without a claim is a store
        // writer's.
        let fresh_binding = &d.key != new_key && d.pending_key.as_ref() != Some(new_key);
        if fresh_binding {
            ownership::check_bindable(ctx, store.tenant(), new_key, Depth::Authenticated).await?;
        } else {
            // A resumed move: the pending key comes from the descriptor (store
            // JSON), and the rules may have changed since the move began.
            ctx.residency.check_key(new_key).map_err(|v| {
                Error::Policy(format!(
                    "refusing {new_key} for tenant {}: {v}",
                    store.tenant()
                ))
            })?;
        }
        probe(repo, new_key).await?;
        if fresh_binding {
            self.plan.steps.push(Step::Claim {
                key: new_key.clone(),
            });
        }
        if d.pending_key.as_ref() == Some(new_key) {
            self.plan.report.resumed = true;
        } else if &d.key != new_key {
            self.plan.steps.push(Step::MarkPending {
                key: new_key.clone(),
            });
        }
        for epoch in envelopes::epochs(repo).await? {
            let (env, _) = envelopes::read(repo, epoch).await?;
            if &env.key != new_key {
                self.rewrap(epoch, &env.key, env.wrapped.key_version.clone(), new_key);
            }
        }
        if &d.key != new_key {
            self.plan.steps.push(Step::SwitchKey {
                from: d.key.clone(),
                to: new_key.clone(),
            });
        }
        if let (Some(days), Some(old)) = (schedule_old_key_deletion, old) {
            self.plan
                .steps
                .push(Step::ScheduleDeletion { key: old, days });
        }
        Ok(())
    }

    async fn new_epoch(&mut self) -> Result<()> {
        let repo = self.repo;
        let d = repo.descriptor();
        let next = d.epochs.iter().map(|e| e.epoch).max().unwrap_or(0) + 1;
        self.plan.report.epoch_after = next;
        // An envelope left by an interrupted run is kept: creation is create-only.
        self.plan.report.resumed = repo
            .store()
            .head(&ObjectName::Envelope(next))
            .await?
            .is_some();
        self.plan.steps.push(Step::NewEpoch {
            epoch: next,
            key: d.key.clone(),
        });
        Ok(())
    }
}

/// Refuses a new key that is not enabled or that custos cannot use: describe,
/// then a wrap and unwrap of a throwaway key under a context no envelope uses
/// (epoch 0; epochs start at 1).
async fn probe(repo: &Repo, new_key: &KeyRef) -> Result<()> {
    let cmk = repo.context().keys.key(new_key)?;
    let info = cmk.describe().await?;
    if !info.state.is_usable() {
        return Err(unusable(new_key, &info));
    }
    let throwaway = DataKey::generate();
    let ctx = WrapContext::tdk(repo.tenant(), 0);
    let wrapped = cmk.wrap(&throwaway, &ctx).await?;
    let back = cmk.unwrap(&wrapped, &ctx).await?;
    if back.fingerprint() != throwaway.fingerprint() {
        return Err(Error::Key(KeyError::Backend {
            provider: new_key.kind().scheme(),
            key: new_key.to_string(),
            message: "a test wrap did not unwrap to the same key".into(),
        }));
    }
    Ok(())
}

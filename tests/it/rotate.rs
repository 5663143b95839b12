//! Rotation under failure: a crash at any point leaves every envelope
//! unwrappable by a live key, and re-running the command finishes the job.
//! Also: dry runs write nothing, unusable new keys are refused, the old key's
//! deletion is guarded. Local store and local key provider (the S3 + KMS
//! variants of the main flows are in tests/it/backends.rs).

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use custos::TenantId;
use custos::context::Context;
use custos::jobs::rotate::{RotateAction, RotateReport, Step};
use custos::jobs::{self, NoProgress};
use custos::keys::{
    DataKey, Destruction, KeyError, KeyInfo, KeyProvider, KeyRef, ProviderKind, WrapContext,
    WrappedKey,
};
use custos::repo::Repo;
use custos::store::lease::LeaseGuard;

/// Delegates to a real provider, but fails `rewrap` once `budget` calls were made:
/// a crash in the middle of a rotation.
#[derive(Debug)]
struct Flaky {
    inner: Arc<dyn KeyProvider>,
    budget: AtomicUsize,
    rotations: AtomicUsize,
}

#[async_trait]
impl KeyProvider for Flaky {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }
    fn custody(&self, key: &KeyRef) -> custos::keys::Custody {
        self.inner.custody(key)
    }
    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.inner.describe(key).await
    }
    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.inner.create_key(key).await
    }
    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        self.inner.generate_data_key(key, ctx).await
    }
    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        self.inner.wrap(key, data_key, ctx).await
    }
    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        self.inner.unwrap(key, wrapped, ctx).await
    }
    async fn rewrap(
        &self,
        from: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
        to: &KeyRef,
    ) -> Result<WrappedKey, KeyError> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(KeyError::Unreachable {
                endpoint: "flaky".into(),
                message: "simulated crash".into(),
            });
        }
        self.budget.store(left - 1, Ordering::SeqCst);
        self.inner.rewrap(from, wrapped, ctx, to).await
    }
    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.rotations.fetch_add(1, Ordering::SeqCst);
        self.inner.rotate(key).await
    }
    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.inner.disable(key).await
    }
    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.inner.enable(key).await
    }
    async fn destroy(&self, key: &KeyRef, days: u32) -> Result<Destruction, KeyError> {
        self.inner.destroy(key, days).await
    }
}

fn flaky(ctx: &Context, budget: usize) -> (Context, Arc<Flaky>) {
    let f = Arc::new(Flaky {
        inner: ctx.keys.local.clone().unwrap(),
        budget: AtomicUsize::new(budget),
        rotations: AtomicUsize::new(0),
    });
    let mut c = ctx.clone();
    c.keys.local = Some(f.clone());
    (c, f)
}

async fn rotate(
    ctx: &Context,
    tenant: &TenantId,
    action: RotateAction,
    dry_run: bool,
) -> custos::Result<RotateReport> {
    let repo = Repo::open(ctx, tenant, None).await?;
    let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "rotate", ctx.lease_ttl).await?;
    let r = if dry_run {
        jobs::rotate::preview(&repo, &action).await
    } else {
        jobs::rotate::run(&repo, &lease, &action).await
    };
    lease.release().await;
    r
}

/// Every live epoch's data key unwraps (under whichever key its envelope names).
async fn all_epochs_unwrap(ctx: &Context, tenant: &TenantId) {
    let repo = Repo::open(ctx, tenant, None).await.unwrap();
    for e in repo.descriptor().live_epochs() {
        repo.epoch_keys(e.epoch)
            .await
            .unwrap_or_else(|err| panic!("epoch {} does not unwrap: {err}", e.epoch));
    }
}

struct Setup {
    ctx: Context,
    tenant: TenantId,
    key: KeyRef,
    data: std::path::PathBuf,
    tmp: tempfile::TempDir,
}

/// A tenant with three epochs, a snapshot in each.
async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), "alpha\n".repeat(5000)).unwrap();
    let ctx = Context::embedded(&tmp.path().join("custos")).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();
    Repo::init(&ctx, &tenant, &key, false).await.unwrap();
    for i in 0..3 {
        if i > 0 {
            rotate(&ctx, &tenant, RotateAction::NewEpoch, false)
                .await
                .unwrap();
        }
        let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
        common::backup_dir(&ctx, &repo, &data).await;
    }
    Setup {
        ctx,
        tenant,
        key,
        data,
        tmp,
    }
}

async fn restore_every_snapshot(s: &Setup) {
    let repo = Repo::open(&s.ctx, &s.tenant, None).await.unwrap();
    let (snaps, faults) = repo.list_snapshots().await.unwrap();
    assert!(faults.is_empty(), "{faults:?}");
    assert_eq!(snaps.len(), 3);
    for snap in snaps {
        let target = s.tmp.path().join(format!(
            "r-{}",
            hex::encode(custos::util::random_bytes::<6>())
        ));
        jobs::restore::run(
            &repo,
            &snap,
            &jobs::restore::RestoreOptions {
                target: target.clone(),
                include: vec![],
                overwrite: false,
            },
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(target.join("data/a.txt")).unwrap(),
            std::fs::read(s.data.join("a.txt")).unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_cmk_interrupted_then_finished() {
    let s = setup().await;
    let new_key = KeyRef::local("acme-2").unwrap();
    s.ctx.keys.key(&new_key).unwrap().create().await.unwrap();
    let action = RotateAction::ReplaceCmk {
        new_key: new_key.clone(),
        schedule_old_key_deletion: None,
    };
    // Crash after the first of three envelopes moved.
    let (crashing, _) = flaky(&s.ctx, 1);
    let err = rotate(&crashing, &s.tenant, action.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "kms_unreachable", "{err}");
    let repo = Repo::open(&s.ctx, &s.tenant, None).await.unwrap();
    assert_eq!(repo.descriptor().pending_key.as_ref(), Some(&new_key));
    assert_eq!(repo.descriptor().key, s.key);
    all_epochs_unwrap(&s.ctx, &s.tenant).await;
    // Mid-move, a policy naming either key opens the tenant.
    Repo::open(&s.ctx, &s.tenant, Some(&s.key)).await.unwrap();
    Repo::open(&s.ctx, &s.tenant, Some(&new_key)).await.unwrap();
    // Any other rotation is refused until the move is finished.
    let err = rotate(&s.ctx, &s.tenant, RotateAction::NewEpoch, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("finish it first"), "{err}");
    // The daemon's `due` names the move to finish (and only to finish: it
    // never starts a move to a key the store names).
    let due = jobs::rotate::due(
        repo.descriptor(),
        &custos::config::RotationPolicy::default(),
        chrono::Utc::now(),
    );
    let finish = RotateAction::FinishReplace {
        new_key: new_key.clone(),
    };
    assert_eq!(due, vec![finish.clone()]);

    // The move was bound before it began: the new key's claim proves it.
    let claim = custos::store::ObjectName::KeyClaim(custos::format::claim::claim_id(&new_key));
    assert!(repo.store().head(&claim).await.unwrap().is_some());
    let r = rotate(&s.ctx, &s.tenant, finish, false).await.unwrap();
    assert!(r.resumed);
    assert_eq!(r.envelopes_rewrapped, 2, "only the two left are moved");
    assert_eq!(r.envelopes_verified, 3);
    let repo = Repo::open(&s.ctx, &s.tenant, Some(&new_key)).await.unwrap();
    assert!(repo.descriptor().pending_key.is_none());
    assert_eq!(repo.descriptor().previous_keys, vec![s.key.clone()]);
    // Nothing depends on the old key: disable it, every snapshot restores.
    s.ctx.keys.key(&s.key).unwrap().disable().await.unwrap();
    restore_every_snapshot(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmk_rotation_interrupted_is_finished_without_rotating_again() {
    let s = setup().await;
    let provider = s.ctx.keys.slot(s.key.kind()).clone().unwrap();
    let v0 = provider.describe(&s.key).await.unwrap().current_version;
    let (crashing, f) = flaky(&s.ctx, 2);
    rotate(&crashing, &s.tenant, RotateAction::Cmk, false)
        .await
        .unwrap_err();
    assert_eq!(f.rotations.load(Ordering::SeqCst), 1);
    all_epochs_unwrap(&s.ctx, &s.tenant).await;

    let (healthy, f) = flaky(&s.ctx, usize::MAX);
    let r = rotate(&healthy, &s.tenant, RotateAction::Cmk, false)
        .await
        .unwrap();
    assert!(r.resumed);
    assert_eq!(f.rotations.load(Ordering::SeqCst), 0, "not rotated twice");
    assert_eq!(r.envelopes_rewrapped, 1);
    let v1 = provider.describe(&s.key).await.unwrap().current_version;
    assert_ne!(v0, v1);
    // Every envelope is now under the newest version.
    let repo = Repo::open(&s.ctx, &s.tenant, None).await.unwrap();
    for e in 1..=3 {
        let env = repo.load_envelope(e).await.unwrap();
        assert_eq!(env.wrapped.key_version, v1, "epoch {e}");
    }
    // A later --cmk rotates again (it is not mistaken for a resumption).
    let r = rotate(&healthy, &s.tenant, RotateAction::Cmk, false)
        .await
        .unwrap();
    assert!(!r.resumed);
    assert_eq!(f.rotations.load(Ordering::SeqCst), 1);
    assert_eq!(r.envelopes_rewrapped, 3);
    restore_every_snapshot(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_epoch_interrupted_after_the_envelope_is_finished() {
    let s = setup().await;
    let repo = Repo::open(&s.ctx, &s.tenant, None).await.unwrap();
    // The crash: the envelope of epoch 4 exists, the descriptor does not know it.
    Repo::create_epoch_envelope(&s.ctx, repo.store(), &s.key, 4)
        .await
        .unwrap();
    drop(repo);
    let r = rotate(&s.ctx, &s.tenant, RotateAction::NewEpoch, false)
        .await
        .unwrap();
    assert!(r.resumed);
    assert_eq!((r.epoch_before, r.epoch_after), (3, 4));
    assert_eq!(r.envelopes_verified, 4);
    let repo = Repo::open(&s.ctx, &s.tenant, None).await.unwrap();
    let d = repo.descriptor();
    assert_eq!(d.current_epoch, 4);
    assert_eq!(
        d.epochs.iter().map(|e| e.state).collect::<Vec<_>>(),
        vec![
            custos::format::descriptor::EpochState::Retired,
            custos::format::descriptor::EpochState::Retired,
            custos::format::descriptor::EpochState::Retired,
            custos::format::descriptor::EpochState::Active
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_nothing_and_bad_new_keys_are_refused() {
    let s = setup().await;
    let listing = |ctx: Context| async move {
        let repo = Repo::open(&ctx, &TenantId::new("acme").unwrap(), None)
            .await
            .unwrap();
        repo.list_objects()
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.name != Some(custos::store::ObjectName::Lease))
            .map(|o| (o.path.to_string(), o.meta.e_tag, o.meta.size))
            .collect::<Vec<_>>()
    };
    let before = listing(s.ctx.clone()).await;
    let new_key = KeyRef::local("acme-new").unwrap();
    let provider = s.ctx.keys.slot(new_key.kind()).clone().unwrap();
    provider.create_key(&new_key).await.unwrap();
    for action in [
        RotateAction::Cmk,
        RotateAction::NewEpoch,
        RotateAction::ReplaceCmk {
            new_key: new_key.clone(),
            schedule_old_key_deletion: None,
        },
    ] {
        let r = rotate(&s.ctx, &s.tenant, action, true).await.unwrap();
        assert!(r.dry_run);
        assert_eq!(r.bytes_written, 0);
    }
    assert_eq!(before, listing(s.ctx.clone()).await);
    let v = provider.describe(&s.key).await.unwrap().current_version;
    assert_eq!(v.as_deref(), Some("1"), "a dry run rotates no key");

    // A disabled key, and a key that does not exist, are refused before anything moves.
    provider.disable(&new_key).await.unwrap();
    let err = rotate(
        &s.ctx,
        &s.tenant,
        RotateAction::ReplaceCmk {
            new_key: new_key.clone(),
            schedule_old_key_deletion: None,
        },
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), "key_unavailable", "{err}");
    assert!(err.to_string().contains("disabled"), "{err}");
    let missing = KeyRef::local("nope").unwrap();
    let err = rotate(
        &s.ctx,
        &s.tenant,
        RotateAction::ReplaceCmk {
            new_key: missing,
            schedule_old_key_deletion: None,
        },
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), "key_unavailable", "{err}");
    assert_eq!(before, listing(s.ctx.clone()).await);

    // The plan a dry run prints is what the rotation then does, step by step.
    let planned = rotate(&s.ctx, &s.tenant, RotateAction::Cmk, true)
        .await
        .unwrap()
        .steps;
    let rewraps: Vec<u32> = planned
        .iter()
        .filter_map(|st| match st {
            Step::Rewrap { epoch, from, to } if from == &s.key && to == &s.key => Some(*epoch),
            _ => None,
        })
        .collect();
    assert_eq!(
        planned.first(),
        Some(&Step::NewMaterial { key: s.key.clone() })
    );
    assert_eq!(rewraps, vec![1, 2, 3], "{planned:?}");
    let done = rotate(&s.ctx, &s.tenant, RotateAction::Cmk, false)
        .await
        .unwrap();
    assert_eq!(done.steps, planned);
    assert_eq!(done.envelopes_rewrapped, 3);
    let planned = rotate(&s.ctx, &s.tenant, RotateAction::NewEpoch, true)
        .await
        .unwrap();
    assert_eq!(
        planned.steps,
        vec![Step::NewEpoch {
            epoch: 4,
            key: s.key.clone()
        }]
    );
    assert_eq!(planned.epoch_after, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_key_deletion_only_when_no_other_tenant_uses_it() {
    let s = setup().await;
    // One key, one tenant: a second tenant cannot even be initialised under it.
    let other = TenantId::new("globex").unwrap();
    let err = Repo::init(&s.ctx, &other, &s.key, false).await.unwrap_err();
    assert_eq!(err.kind(), "key_in_use", "{err}");
    // Another tenant's descriptor names the CMK (shared before that was
    // enforced, or edited): its deletion must be refused.
    let other_key = KeyRef::local("globex").unwrap();
    Repo::init(&s.ctx, &other, &other_key, false).await.unwrap();
    let globex = s.tmp.path().join("custos/store/tenants/globex/tenant.json");
    let original = std::fs::read(&globex).unwrap();
    let mut d: serde_json::Value = serde_json::from_slice(&original).unwrap();
    d["previous_keys"] = serde_json::json!([s.key.to_string()]);
    std::fs::write(&globex, serde_json::to_vec(&d).unwrap()).unwrap();
    let new_key = KeyRef::local("acme-2").unwrap();
    let provider = s.ctx.keys.slot(new_key.kind()).clone().unwrap();
    provider.create_key(&new_key).await.unwrap();
    let action = RotateAction::ReplaceCmk {
        new_key: new_key.clone(),
        schedule_old_key_deletion: Some(7),
    };
    let err = rotate(&s.ctx, &s.tenant, action.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "key_in_use", "{err}");
    assert!(
        err.to_string().contains("tenant globex: its descriptor"),
        "{err}"
    );
    // The move itself was done and verified; only the deletion was refused.
    let repo = Repo::open(&s.ctx, &s.tenant, Some(&new_key)).await.unwrap();
    assert_eq!(repo.descriptor().key, new_key);
    assert!(provider.describe(&s.key).await.unwrap().state.is_usable());

    // Once the other tenant no longer names it, the re-run deletes the old key.
    std::fs::write(&globex, &original).unwrap();
    let r = rotate(&s.ctx, &s.tenant, action, false).await.unwrap();
    let d = r.old_key_deletion.expect("deletion done");
    assert!(!d.state_after.is_usable());
    // Destroyed for good, and every snapshot still restores.
    restore_every_snapshot(&s).await;
}

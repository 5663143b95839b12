//! The whole flow on every backend, in the style of object_store's
//! `integration.rs`: one test body per flow, parametrised by backend.
//!
//! - `local_*`: the local store with the local key provider. Always runs.
//! - `s3_kms_*`: S3 with AWS KMS on the emulators (LocalStack or moto, from
//!   `scripts/emulators.sh start`). Runs when `CUSTOS_TEST_EMULATORS=1` and
//!   must then pass; otherwise prints `skipped:` and returns. Each run creates
//!   its own KMS keys and writes under a unique prefix of the test bucket.
//!
//! - `kmip_*`: the local store with CMKs on a KMIP key manager (PyKMIP from
//!   `scripts/pykmip.sh start`, or the one CUSTOS_TEST_KMIP_* name). Runs
//!   when those variables are set; with `CUSTOS_TEST_EMULATORS=1` they must be.
//!   `kmip_backend_shred_and_certificate` drives the CLI with `[kmip]` in
//!   custos.toml: backup, rotate, check, shred, certificate verify --online.
//!
//! Every request goes to 127.0.0.1: endpoints default to the emulator's, and
//! credentials are static (never the EC2 metadata service).
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common::{self, env};

use std::fs;
use std::path::Path;
use std::sync::Arc;

use custos::TenantId;
use custos::context::Context;
use custos::jobs::rotate::{RotateAction, RotateReport};
use custos::jobs::{self, NoProgress};
use custos::keys::aws_kms::AwsKmsProvider;
use custos::keys::kmip::KmipProvider;
use custos::keys::{KeyProvider, KeyRef};
use custos::pipeline::packer::PackerConfig;
use custos::repo::Repo;
use custos::store::ObjectName;
use custos::store::lease::LeaseGuard;
use object_store::ObjectStoreExt;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

struct Backend {
    name: &'static str,
    ctx: Context,
    /// Makes a fresh CMK usable by `ctx`.
    keys: KeyMaker,
    _tmp: tempfile::TempDir,
    /// Held while a test uses the PKCS#11 token.
    _token: Option<common::TokenUse>,
}

enum KeyMaker {
    Local,
    Kms(Arc<AwsKmsProvider>),
    /// Keys on a PKCS#11 token (the token's label).
    Pkcs11(String),
    Kmip(Arc<KmipProvider>),
}

impl Backend {
    async fn fresh_key(&self, hint: &str) -> KeyRef {
        match &self.keys {
            KeyMaker::Local => KeyRef::local(&format!(
                "{hint}-{}",
                hex::encode(custos::util::random_bytes::<4>())
            ))
            .unwrap(),
            KeyMaker::Kms(kms) => kms.create_test_key(None).await.unwrap_or_else(|e| {
                panic!(
                    "CUSTOS_TEST_EMULATORS=1 but creating a KMS key at {} failed: {e}",
                    kms.endpoint()
                )
            }),
            // Created now: `Repo::init` makes no HSM object unasked.
            KeyMaker::Pkcs11(token) => {
                let key = common::pkcs11_key(token, hint);
                // No retry: custos serialises its object writes per module,
                // and tests that run custos as a child process hold the token
                // alone (common::pkcs11_alone), the two ways SoftHSM2 failed.
                self.ctx
                    .keys
                    .key(&key)
                    .unwrap()
                    .create()
                    .await
                    .unwrap_or_else(|e| panic!("creating {key} on the token: {e}"));
                key
            }
            KeyMaker::Kmip(kmip) => {
                let key = KeyRef::parse(&format!(
                    "kmip:name/custos-{hint}-{}",
                    hex::encode(custos::util::random_bytes::<6>())
                ))
                .unwrap();
                kmip.create_key(&key).await.unwrap_or_else(|e| {
                    panic!(
                        "creating a key on KMIP server {} failed: {e}",
                        kmip.server()
                    )
                });
                key
            }
        }
    }

    /// Creates the key in the provider where custos manages key creation (local).
    async fn ensure_created(&self, key: &KeyRef) {
        if let KeyMaker::Local | KeyMaker::Pkcs11(_) = self.keys {
            self.ctx.keys.key(key).unwrap().create().await.unwrap();
        }
    }
}

fn local_backend() -> Backend {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Context::embedded(tmp.path()).unwrap();
    Backend {
        name: "local",
        ctx,
        keys: KeyMaker::Local,
        _tmp: tmp,
        _token: None,
    }
}

async fn s3_kms_backend() -> Option<Backend> {
    if !common::strict() {
        eprintln!("skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)");
        return None;
    }
    let kms_settings = common::aws_settings();
    let bucket = common::s3_bucket();
    let prefix = format!(
        "backends/{}",
        hex::encode(custos::util::random_bytes::<6>())
    );
    let store = custos::store::s3::open(&bucket, &prefix, &common::s3_options()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx =
        Context::with_store(store, format!("s3://{bucket}/{prefix}"), tmp.path()).unwrap();
    let kms = Arc::new(
        AwsKmsProvider::new(&kms_settings)
            .await
            .expect("AWS KMS provider from the test environment"),
    );
    ctx.keys.aws_kms = Some(kms.clone());
    Some(Backend {
        name: "s3+kms",
        ctx,
        keys: KeyMaker::Kms(kms),
        _tmp: tmp,
        _token: None,
    })
}

/// The local store with keys on a PKCS#11 token (SoftHSM2 from
/// `scripts/softhsm.sh start`, or the token the `CUSTOS_TEST_PKCS11_*`
/// variables name); skipped without one, a failure under CUSTOS_TEST_EMULATORS=1.
fn pkcs11_backend() -> Option<Backend> {
    let (settings, token) = common::pkcs11_settings()?;
    let token_use = common::pkcs11_shared();
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx = Context::embedded(tmp.path()).unwrap();
    let provider = custos::keys::pkcs11::Pkcs11Provider::open(&settings)
        .unwrap_or_else(|e| panic!("PKCS#11 provider from the test environment: {e}"));
    ctx.keys.pkcs11 = Some(Arc::new(provider));
    Some(Backend {
        name: "pkcs11",
        ctx,
        keys: KeyMaker::Pkcs11(token),
        _tmp: tmp,
        _token: Some(token_use),
    })
}

/// The local store with CMKs on the KMIP server the environment names.
fn kmip_backend() -> Option<Backend> {
    let settings = common::kmip_settings()?;
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx = Context::embedded(tmp.path()).unwrap();
    let kmip =
        Arc::new(KmipProvider::new(&settings).expect("KMIP provider from the test environment"));
    ctx.keys.kmip = Some(kmip.clone());
    Some(Backend {
        name: "kmip",
        ctx,
        keys: KeyMaker::Kmip(kmip),
        _tmp: tmp,
        _token: None,
    })
}

/// s3s-fs (a signature-checking S3, the MinIO stand-in) with local keys:
/// runs when `CUSTOS_TEST_S3S_FS_ENDPOINT` is set (e.g. http://127.0.0.1:8014),
/// with `CUSTOS_TEST_S3S_FS_ACCESS_KEY` / `_SECRET_KEY` (default AK / SK) and
/// an existing bucket `CUSTOS_TEST_S3S_FS_BUCKET` (default custos-test).
fn s3s_fs_backend(secret_override: Option<&str>) -> Option<Backend> {
    let Some(endpoint) = env("CUSTOS_TEST_S3S_FS_ENDPOINT") else {
        eprintln!("skipped: set CUSTOS_TEST_S3S_FS_ENDPOINT to run against s3s-fs");
        return None;
    };
    let bucket = env("CUSTOS_TEST_S3S_FS_BUCKET").unwrap_or_else(|| "custos-test".into());
    let prefix = format!(
        "backends/{}",
        hex::encode(custos::util::random_bytes::<6>())
    );
    let store = custos::store::s3::open(
        &bucket,
        &prefix,
        &custos::store::s3::S3Options {
            region: Some("us-east-1".into()),
            endpoint_url: Some(endpoint),
            allow_http: Some(true),
            access_key_id: Some(
                env("CUSTOS_TEST_S3S_FS_ACCESS_KEY").unwrap_or_else(|| "AK".into()),
            ),
            secret_access_key: Some(
                secret_override
                    .map(str::to_owned)
                    .or_else(|| env("CUSTOS_TEST_S3S_FS_SECRET_KEY"))
                    .unwrap_or_else(|| "SK".into()),
            ),
            session_token: None,
        },
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Context::with_store(store, format!("s3://{bucket}/{prefix}"), tmp.path()).unwrap();
    Some(Backend {
        name: "s3s-fs",
        ctx,
        keys: KeyMaker::Local,
        _tmp: tmp,
        _token: None,
    })
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn backup(repo: &Repo, lease: &LeaseGuard, data: &Path) -> jobs::backup::BackupReport {
    jobs::backup::run(repo, lease, common::backup_options(data), &NoProgress)
        .await
        .unwrap()
}

/// The tenant's packs, index files and snapshots: path, size and e-tag.
async fn sealed_data(repo: &Repo) -> Vec<(object_store::path::Path, u64, Option<String>)> {
    repo.list_objects()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| {
            matches!(
                o.name,
                Some(ObjectName::Pack(_) | ObjectName::Index(_) | ObjectName::Snapshot(_))
            )
        })
        .map(|o| (o.path, o.meta.size, o.meta.e_tag))
        .collect()
}

async fn lease(ctx: &Context, repo: &Repo, job: &str) -> LeaseGuard {
    LeaseGuard::acquire(repo.store(), &ctx.holder, job, ctx.lease_ttl)
        .await
        .unwrap()
}

/// Restores every snapshot of the tenant into a fresh directory and compares
/// it with `expected` (the data each snapshot was taken of).
async fn restore_all(ctx: &Context, tenant: &TenantId, expected: &Path, scratch: &Path) -> usize {
    let repo = Repo::open(ctx, tenant, None).await.unwrap();
    let (snaps, faults) = repo.list_snapshots().await.unwrap();
    assert!(faults.is_empty(), "{faults:?}");
    for s in &snaps {
        let target = scratch.join(format!(
            "restore-{}-{}",
            s.id.short(),
            hex::encode(custos::util::random_bytes::<4>())
        ));
        jobs::restore::run(
            &repo,
            s,
            &jobs::restore::RestoreOptions {
                target: target.clone(),
                include: vec![],
                overwrite: false,
            },
            &NoProgress,
        )
        .await
        .unwrap_or_else(|e| panic!("restore of snapshot {} failed: {e}", s.id));
        common::assert_same(expected, &target.join("data"));
    }
    snaps.len()
}

async fn rotate(ctx: &Context, tenant: &TenantId, action: RotateAction) -> RotateReport {
    let repo = Repo::open(ctx, tenant, None).await.unwrap();
    let lease = lease(ctx, &repo, "rotate").await;
    let r = jobs::rotate::run(&repo, &lease, &action).await.unwrap();
    lease.release().await;
    r
}

fn tenant(hint: &str) -> TenantId {
    TenantId::new(&format!(
        "{hint}-{}",
        hex::encode(custos::util::random_bytes::<3>())
    ))
    .unwrap()
}

// ---------------------------------------------------------------------------
// Flows
// ---------------------------------------------------------------------------

/// Backup, byte-identical restore, incremental backup, check --read-data,
/// forget + prune, and a flipped byte in a pack found by check --read-data.
async fn flow(ctx: &Context, key: &KeyRef) {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    common::make_tree(&data, 40);
    let tenant = tenant("flow");
    let (repo, created) = Repo::init(ctx, &tenant, key, false).await.unwrap();
    assert!(created);
    let lease = lease(ctx, &repo, "backup").await;

    let first = backup(&repo, &lease, &data).await;
    assert_eq!(first.summary.files, 44);
    assert!(first.summary.bytes_stored > 3 << 20);
    fs::write(data.join("dir/new.txt"), "added later").unwrap();
    let second = backup(&repo, &lease, &data).await;
    assert_eq!(second.parent, Some(first.snapshot));
    assert_eq!(second.summary.files_read, 1, "only the new file is read");

    let snap = repo.find_snapshot("latest").await.unwrap();
    let target = scratch.path().join("restore");
    let r = jobs::restore::run(
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
    assert_eq!(r.files, 45);
    common::assert_same(&data, &target.join("data"));

    let report = jobs::check::run(&repo, jobs::check::ReadData::All)
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.faults);

    // Forget the first snapshot, prune, check again.
    let rules = custos::config::KeepRules {
        keep_last: 1,
        ..Default::default()
    };
    // A dry run is the plan: it states what the run then does, and deletes nothing.
    let planned = jobs::forget::plan(&repo, &rules).await.unwrap().preview();
    assert!(planned.dry_run);
    assert_eq!((planned.kept, planned.removed), (1, 1));
    assert_eq!(repo.list_snapshots().await.unwrap().0.len(), 2);
    let f = jobs::forget::run(&repo, &lease, &rules).await.unwrap();
    assert_eq!((f.kept, f.removed), (1, 1));
    assert!(!f.dry_run);
    let packs_before = repo.list_packs().await.unwrap();
    let planned = jobs::prune::plan(&repo).await.unwrap().preview();
    assert!(planned.dry_run);
    assert_eq!(repo.list_packs().await.unwrap(), packs_before);
    let pruned = jobs::prune::run(&repo, &lease, PackerConfig::default())
        .await
        .unwrap();
    assert!(!pruned.dry_run);
    assert_eq!(
        (
            planned.packs_deleted,
            planned.packs_repacked,
            planned.packs_unreferenced_deleted,
            planned.bytes_freed,
        ),
        (
            pruned.packs_deleted,
            pruned.packs_repacked,
            pruned.packs_unreferenced_deleted,
            pruned.bytes_freed,
        )
    );
    let (snaps, _) = repo.list_snapshots().await.unwrap();
    assert_eq!(
        snaps.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![second.snapshot]
    );
    let report = jobs::check::run(&repo, jobs::check::ReadData::All)
        .await
        .unwrap();
    assert!(report.ok(), "after prune: {:?}", report.faults);

    // Tamper: flip one byte in the middle of the largest pack.
    let packs = repo.list_packs().await.unwrap();
    let (&pack, &size) = packs.iter().max_by_key(|(_, s)| **s).unwrap();
    let path = object_store::path::Path::from(format!(
        "tenants/{tenant}/{}",
        ObjectName::Pack(pack).relative()
    ));
    let mut bytes = ctx
        .store
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[(size / 2) as usize] ^= 0x01;
    ctx.store.put(&path, bytes.into()).await.unwrap();
    let report = jobs::check::run(&repo, jobs::check::ReadData::All)
        .await
        .unwrap();
    assert!(!report.ok(), "a flipped byte must be found");
    assert!(
        report
            .faults
            .iter()
            .any(|f| f.object.contains(&pack.to_hex())),
        "{:?}",
        report.faults
    );

    // Tamper with the wrapped data key: the provider refuses it, nothing decrypts.
    let env_path = object_store::path::Path::from(format!("tenants/{tenant}/keys/1"));
    let raw = ctx
        .store
        .get(&env_path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut env: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let ct = env["wrapped"]["ciphertext"].as_str().unwrap().to_owned();
    use base64::Engine;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(&ct)
        .unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    env["wrapped"]["ciphertext"] = base64::engine::general_purpose::STANDARD
        .encode(&bytes)
        .into();
    ctx.store
        .put(&env_path, serde_json::to_vec(&env).unwrap().into())
        .await
        .unwrap();
    let fresh = Repo::open(ctx, &tenant, None).await.unwrap();
    let err = fresh.epoch_keys(1).await.unwrap_err();
    eprintln!("tampered envelope: {err}");
    assert!(
        matches!(err.kind().as_str(), "key_unwrap_failed" | "key_unavailable"),
        "{}: {err}",
        err.kind()
    );
    assert!(!err.is_transient());
    lease.release().await;
}

/// --cmk, --new-epoch and --replace-cmk; every snapshot restores after each,
/// and after the old key is disabled.
async fn rotation_flow(b: &Backend) {
    let ctx = &b.ctx;
    let key = b.fresh_key("rot").await;
    let new_key = b.fresh_key("rot-new").await;
    b.ensure_created(&new_key).await;
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    common::make_tree_with(&data, 40, 1 << 20);
    let tenant = tenant("rot");
    let (repo, _) = Repo::init(ctx, &tenant, &key, false).await.unwrap();
    let l = lease(ctx, &repo, "backup").await;
    backup(&repo, &l, &data).await;
    l.release().await;
    drop(repo);

    let r = rotate(ctx, &tenant, RotateAction::Cmk).await;
    eprintln!(
        "[{}] --cmk: {} envelope(s), {} bytes, versions {:?} -> {:?}, {} ms",
        b.name,
        r.envelopes_rewrapped,
        r.bytes_written,
        r.key_version_before,
        r.key_version_after,
        r.duration_ms
    );
    assert_eq!((r.envelopes_rewrapped, r.envelopes_verified), (1, 1));
    assert_eq!(restore_all(ctx, &tenant, &data, scratch.path()).await, 1);

    let r = rotate(ctx, &tenant, RotateAction::NewEpoch).await;
    assert_eq!((r.epoch_before, r.epoch_after), (1, 2));
    let repo = Repo::open(ctx, &tenant, None).await.unwrap();
    let l = lease(ctx, &repo, "backup").await;
    let second = backup(&repo, &l, &data).await;
    assert_eq!(second.epoch, 2);
    assert!(
        second.summary.files_read > 0,
        "dedup starts afresh in a new epoch"
    );
    l.release().await;
    drop(repo);

    let r = rotate(
        ctx,
        &tenant,
        RotateAction::ReplaceCmk {
            new_key: new_key.clone(),
            schedule_old_key_deletion: None,
        },
    )
    .await;
    eprintln!(
        "[{}] --replace-cmk: {} envelope(s), {} bytes, {} ms",
        b.name, r.envelopes_rewrapped, r.bytes_written, r.duration_ms
    );
    assert_eq!((r.envelopes_rewrapped, r.envelopes_verified), (2, 2));
    let repo = Repo::open(ctx, &tenant, Some(&new_key)).await.unwrap();
    let d = repo.descriptor();
    assert_eq!(d.key, new_key);
    assert_eq!(d.previous_keys, vec![key.clone()]);
    assert!(d.pending_key.is_none());
    // A policy still naming the old key is refused with a message that says what to do.
    let err = Repo::open(ctx, &tenant, Some(&key)).await.unwrap_err();
    assert!(
        err.to_string().contains("was moved from key")
            && err.to_string().contains(&new_key.to_string()),
        "{err}"
    );
    // Idempotent: a re-run finds nothing to move.
    let again = rotate(
        ctx,
        &tenant,
        RotateAction::ReplaceCmk {
            new_key: new_key.clone(),
            schedule_old_key_deletion: None,
        },
    )
    .await;
    assert_eq!((again.envelopes_rewrapped, again.bytes_written), (0, 0));

    // Nothing depends on the old key any more.
    ctx.keys.key(&key).unwrap().disable().await.unwrap();
    assert_eq!(restore_all(ctx, &tenant, &data, scratch.path()).await, 2);
    let repo = Repo::open(ctx, &tenant, None).await.unwrap();
    let report = jobs::check::run(&repo, jobs::check::ReadData::All)
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.faults);
}

/// Rotation writes envelopes and the descriptor only: the same bytes for
/// twice the data, and no pack, index or snapshot changes.
async fn rotation_cost(b: &Backend) {
    let ctx = &b.ctx;
    let mut written = Vec::new();
    for (factor, mib) in [(1, 4usize), (2, 8)] {
        let key = b.fresh_key("cost").await;
        let scratch = tempfile::tempdir().unwrap();
        let data = scratch.path().join("data");
        common::make_tree_with(&data, 40, mib << 20);
        let tenant = tenant("cost");
        let (repo, _) = Repo::init(ctx, &tenant, &key, false).await.unwrap();
        let l = lease(ctx, &repo, "backup").await;
        let rep = backup(&repo, &l, &data).await;
        l.release().await;
        let before = sealed_data(&repo).await;
        drop(repo);
        let r = rotate(ctx, &tenant, RotateAction::Cmk).await;
        let repo = Repo::open(ctx, &tenant, None).await.unwrap();
        let after = sealed_data(&repo).await;
        assert_eq!(
            before, after,
            "rotation must not touch packs, index or snapshots"
        );
        eprintln!(
            "[{}] {factor}x data ({} stored): --cmk wrote {} bytes in {} objects, {} ms",
            b.name, rep.summary.bytes_stored, r.bytes_written, r.objects_written, r.duration_ms
        );
        written.push((rep.summary.bytes_stored, r.bytes_written, r.objects_written));
    }
    let ((d1, w1, o1), (d2, w2, o2)) = (written[0], written[1]);
    assert!(
        d2 > d1 * 3 / 2,
        "the second tenant holds about twice the data"
    );
    assert_eq!(o1, o2, "same number of objects written");
    // Timestamps in the JSON vary by a few digits; nothing else may differ.
    assert!(
        w1.abs_diff(w2) <= 16 && w1 < 8192,
        "rotation bytes: {w1} for 1x, {w2} for 2x"
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_flow() {
    let b = local_backend();
    let key = b.fresh_key("flow").await;
    flow(&b.ctx, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_rotation() {
    let b = local_backend();
    rotation_flow(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_rotation_cost() {
    let b = local_backend();
    rotation_cost(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_kms_backend_flow() {
    let Some(b) = s3_kms_backend().await else {
        return;
    };
    let key = b.fresh_key("flow").await;
    flow(&b.ctx, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_kms_backend_rotation() {
    let Some(b) = s3_kms_backend().await else {
        return;
    };
    rotation_flow(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_kms_backend_rotation_cost() {
    let Some(b) = s3_kms_backend().await else {
        return;
    };
    rotation_cost(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_backend_flow() {
    let Some(b) = pkcs11_backend() else {
        return;
    };
    let key = b.fresh_key("flow").await;
    flow(&b.ctx, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_backend_flow() {
    let Some(b) = kmip_backend() else {
        return;
    };
    let key = b.fresh_key("flow").await;
    flow(&b.ctx, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_backend_rotation() {
    let Some(b) = pkcs11_backend() else {
        return;
    };
    rotation_flow(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_backend_rotation() {
    let Some(b) = kmip_backend() else {
        return;
    };
    rotation_flow(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_backend_rotation_cost() {
    let Some(b) = pkcs11_backend() else {
        return;
    };
    rotation_cost(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_backend_rotation_cost() {
    let Some(b) = kmip_backend() else {
        return;
    };
    rotation_cost(&b).await;
}

/// The whole flow through the CLI with `[kmip]` in custos.toml: backup,
/// rotate --cmk (a new version object), check --read-data, restore, forget,
/// shred (Revoke + Destroy of both versions), then the certificate verifies
/// offline and online, and the key manager holds none of the objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_backend_shred_and_certificate() {
    let Some(settings) = common::kmip_settings() else {
        return;
    };
    let kmip = KmipProvider::new(&settings).unwrap();
    let cli = common::Cli::new();
    let toml = cli.path().join("custos.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "[kmip]\nserver = \"{}\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nconnect_timeout = \"2s\"\noperation_timeout = \"20s\"\n",
        settings.server,
        settings.ca_file.display(),
        settings.client_cert_file.display(),
        settings.client_key_file.display(),
    ));
    fs::write(&toml, text).unwrap();
    let key = KeyRef::parse(&format!(
        "kmip:name/custos-shred-{}",
        hex::encode(custos::util::random_bytes::<6>())
    ))
    .unwrap();
    kmip.create_key(&key).await.unwrap();
    let tenant = "kmip-flow";
    let src = cli.path().join("src");
    common::make_tree(&src, 10);
    fs::write(
        cli.path().join(format!("policies/{tenant}.toml")),
        format!(
            "tenant = \"{tenant}\"\nkey = \"{key}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[retention]\nkeep_last = 1\n",
            src.display()
        ),
    )
    .unwrap();
    cli.ok(&["backup", tenant]);
    fs::write(src.join("later.txt"), "later").unwrap();
    cli.ok(&["backup", tenant]);
    let r = cli.ok(&["rotate", tenant, "--cmk", "--json"]);
    let j = r.json();
    assert_ne!(
        j["result"]["key_version_before"], j["result"]["key_version_after"],
        "{j}"
    );
    cli.ok(&["check", tenant, "--read-data"]);
    let target = cli.path().join("restored");
    cli.ok(&[
        "restore",
        tenant,
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    common::assert_same(&src, &target.join("data"));
    cli.ok(&["forget", tenant, "--keep-last", "1", "--prune"]);
    let shown = cli.ok(&["tenant", "show", tenant, "--json"]).stdout;
    assert!(!shown.contains("PRIVATE KEY"));

    let key_pub = cli.ok(&["audit", "public-key"]).stdout.trim().to_owned();
    fs::write(cli.path().join("audit.pub"), &key_pub).unwrap();
    let cert = cli.path().join("cert.json");
    let r = cli.ok(&[
        "shred",
        tenant,
        "--confirm",
        tenant,
        "--reason",
        "offboarding",
        "--out",
        cert.to_str().unwrap(),
        "--json",
    ]);
    let res = r.json()["result"].clone();
    eprintln!("[kmip] shred: {res}");
    assert_eq!(res["guarantee"], "keys_destroyed", "{res}");
    let k = &res["keys"][0];
    assert_eq!(k["action"], "revoked_and_destroyed", "{res}");
    assert_eq!(k["state_after"]["state"], "destroyed", "{res}");
    let v = custos::jobs::shred::certificate::verify(&fs::read(&cert).unwrap(), &key_pub).unwrap();
    assert!(v.certificate.verification.passed);
    assert!(v.certificate.guarantee.pending.is_none());
    let r = cli.ok(&[
        "certificate",
        "verify",
        cert.to_str().unwrap(),
        "--public-key",
        cli.path().join("audit.pub").to_str().unwrap(),
        "--online",
        "--json",
    ]);
    let o = r.json();
    assert_eq!(o["ok"], true, "{o}");
    assert_eq!(o["result"]["online"]["ok"], true, "{o}");
    // The key manager holds no version of the key any more.
    assert!(matches!(
        kmip.describe(&key).await.unwrap().state,
        custos::keys::KeyState::Destroyed { .. }
    ));
}

/// A `kmip:` key without `[kmip]` in custos.toml: a clear error that says
/// what to configure (no server needed).
#[test]
fn kmip_without_configuration_is_named() {
    let cli = common::Cli::new();
    let src = cli.path().join("src");
    common::make_tree(&src, 1);
    fs::write(
        cli.path().join("policies/kmip-none.toml"),
        format!(
            "tenant = \"kmip-none\"\nkey = \"kmip:name/custos-none\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n",
            src.display()
        ),
    )
    .unwrap();
    let r = cli.run(&["backup", "kmip-none", "--json"]);
    assert_ne!(r.code, 0);
    let j = r.json();
    assert_eq!(j["error"]["kind"], "key_provider_unsupported", "{j}");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("[kmip]") && msg.contains("kmip:name/custos-none"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_backend_flow() {
    let Some(b) = s3s_fs_backend(None) else {
        return;
    };
    let key = b.fresh_key("flow").await;
    flow(&b.ctx, &key).await;
    rotation_flow(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_wrong_credentials_are_a_clear_error() {
    let Some(b) = s3s_fs_backend(Some("not-the-secret")) else {
        return;
    };
    let key = b.fresh_key("creds").await;
    let err = Repo::init(&b.ctx, &TenantId::new("acme").unwrap(), &key, false)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.kind(), "invalid_store", "{err}");
    assert!(err.to_string().contains("Signature"), "{err}");
}

/// One key, one tenant, even under another name (alias vs ARN: keys are
/// compared by resolved key id): a second tenant cannot be initialised under
/// the ARN of a key the first uses by alias; and the old key is not deleted
/// while another tenant's descriptor names it (as a store shared before this
/// was enforced, or edited, would), under another name too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_kms_backend_shared_key_is_not_deleted() {
    let Some(b) = s3_kms_backend().await else {
        return;
    };
    let KeyMaker::Kms(kms) = &b.keys else {
        unreachable!()
    };
    let alias = format!(
        "alias/custos-shared-{}",
        hex::encode(custos::util::random_bytes::<4>())
    );
    let arn = kms.create_test_key(Some(&alias)).await.unwrap();
    let by_alias = KeyRef::parse(&format!("aws-kms:{alias}")).unwrap();
    assert_ne!(arn, by_alias);
    let (a, other) = (tenant("share-a"), tenant("share-b"));
    Repo::init(&b.ctx, &a, &by_alias, false).await.unwrap();
    let err = Repo::init(&b.ctx, &other, &arn, false).await.unwrap_err();
    assert_eq!(err.kind(), "key_in_use", "{err}");
    assert!(err.to_string().contains(&format!("tenant {a}")), "{err}");
    // The other tenant under a key of its own, whose descriptor also names
    // the shared key by its ARN.
    let own = b.fresh_key("share-own").await;
    Repo::init(&b.ctx, &other, &own, false).await.unwrap();
    let store = custos::store::TenantStore::new(b.ctx.store.clone(), &other);
    let (bytes, _) = store
        .get_if_exists(&custos::store::ObjectName::Descriptor)
        .await
        .unwrap()
        .unwrap();
    let mut d = custos::format::descriptor::Descriptor::parse(&bytes).unwrap();
    d.previous_keys.push(arn.clone());
    d.generation += 1;
    store
        .put(
            &custos::store::ObjectName::Descriptor,
            bytes::Bytes::from(d.to_json()),
        )
        .await
        .unwrap();
    let new_key = b.fresh_key("share-new").await;
    let repo = Repo::open(&b.ctx, &a, None).await.unwrap();
    let l = lease(&b.ctx, &repo, "rotate").await;
    let err = jobs::rotate::run(
        &repo,
        &l,
        &RotateAction::ReplaceCmk {
            new_key,
            schedule_old_key_deletion: Some(7),
        },
    )
    .await
    .unwrap_err();
    l.release().await;
    assert_eq!(err.kind(), "key_in_use", "{err}");
    assert!(
        err.to_string().contains(&format!(
            "tenant {other}: its descriptor (active) names {arn}"
        )),
        "{err}"
    );
    let info = kms.describe(&arn).await.unwrap();
    assert!(info.state.is_usable(), "the shared key was left alone");
}

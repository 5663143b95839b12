//! An object-store prefix as a backup source, and restore to a prefix.
//!
//! - `file_prefix_*`: a `file:///…` prefix (object_store's LocalFileSystem):
//!   always runs.
//! - `s3_prefix_*`: a prefix of the emulator's `custos-attachments` bucket,
//!   restored to a prefix of the test bucket: runs when
//!   `CUSTOS_TEST_EMULATORS=1`, else prints `skipped:`.

use std::path::Path;

use crate::common;
use custos::TenantId;
use custos::context::Context;
use custos::jobs::restore_to_store::{RestoreToStoreOptions, RestoreToStoreReport};
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::pipeline::packer::PackerConfig;
use custos::repo::Repo;
use custos::source::Source;
use custos::store::SharedStore;
use custos::store::lease::LeaseGuard;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    custos::util::fill_random(&mut v);
    v
}

/// key → content, the objects every test starts from (one larger than the
/// 8 MiB upload buffer, so restoring it goes multipart).
fn objects() -> Vec<(String, Vec<u8>)> {
    vec![
        ("invoice-1.pdf".into(), random(2 << 20)),
        ("2024/03/scan.png".into(), random(70_000)),
        ("2024/notes.txt".into(), b"notes\n".repeat(100)),
        ("big.bin".into(), random(12 << 20)),
        ("empty".into(), Vec::new()),
    ]
}

async fn put_all(store: &SharedStore, objs: &[(String, Vec<u8>)]) {
    for (k, v) in objs {
        store
            .put(&ObjPath::from(k.as_str()), v.clone().into())
            .await
            .unwrap();
    }
}

async fn read_all(store: &SharedStore) -> Vec<(String, Vec<u8>)> {
    let metas: Vec<_> = store.list(None).map(|m| m.unwrap()).collect().await;
    let mut out = Vec::new();
    for m in metas {
        let b = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        out.push((m.location.to_string(), b.to_vec()));
    }
    out.sort();
    out
}

async fn backup(ctx: &Context, tenant: &TenantId, url: &str) -> jobs::backup::BackupReport {
    let key = KeyRef::local(tenant.as_str()).unwrap();
    let repo = match Repo::open(ctx, tenant, None).await {
        Ok(r) => r,
        Err(_) => Repo::init(ctx, tenant, &key, false).await.unwrap().0,
    };
    let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "backup", ctx.lease_ttl)
        .await
        .unwrap();
    let r = jobs::backup::run(
        &repo,
        &lease,
        jobs::backup::BackupOptions {
            sources: vec![Source::ObjectStore {
                name: "attachments".into(),
                url: url.into(),
            }],
            packer: PackerConfig::default(),
            allow_unreadable: false,
            tags: vec![],
            force_read: false,
        },
        &NoProgress,
    )
    .await
    .unwrap();
    lease.release().await;
    r
}

async fn restore_to(
    ctx: &Context,
    tenant: &TenantId,
    url: &str,
    overwrite: bool,
) -> custos::Result<RestoreToStoreReport> {
    let repo = Repo::open(ctx, tenant, None).await.unwrap();
    let target = custos::source::object_store::open_url(url, &ctx.s3).unwrap();
    jobs::restore_to_store::run(
        &repo,
        "latest",
        &RestoreToStoreOptions {
            target,
            target_url: url.into(),
            include: vec![],
            overwrite,
        },
        &NoProgress,
    )
    .await
}

/// The common flow over any source prefix and restore prefix.
async fn source_flow(ctx: &Context, source_url: &str, restore_url: &str, scratch: &Path) {
    let source = custos::source::object_store::open_url(source_url, &ctx.s3).unwrap();
    let objs = objects();
    put_all(&source, &objs).await;
    let tenant = TenantId::new("acme").unwrap();

    let first = backup(ctx, &tenant, source_url).await;
    assert_eq!(first.summary.files, 5);
    assert_eq!(first.summary.dirs, 3, "attachments, 2024, 2024/03");
    assert_eq!(
        first.summary.bytes_in,
        objs.iter().map(|(_, v)| v.len() as u64).sum::<u64>()
    );
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);

    // Unchanged objects are not read again; a changed one is (same size, new e-tag).
    let second = backup(ctx, &tenant, source_url).await;
    assert_eq!(second.summary.files_read, 0);
    let mut changed = objs.clone();
    changed[1].1 = random(70_000);
    put_all(&source, &changed[1..2]).await;
    let third = backup(ctx, &tenant, source_url).await;
    assert_eq!(third.summary.files_read, 1);

    // Restore into a directory: keys became paths under the source name.
    let repo = Repo::open(ctx, &tenant, None).await.unwrap();
    let snap = repo.find_snapshot("latest").await.unwrap();
    let dir = scratch.join("restored");
    jobs::restore::run(
        &repo,
        &snap,
        &jobs::restore::RestoreOptions {
            target: dir.clone(),
            include: vec![],
            overwrite: false,
        },
        &NoProgress,
    )
    .await
    .unwrap();
    for (k, v) in &changed {
        let got = std::fs::read(dir.join("attachments").join(k)).unwrap();
        assert!(got == *v, "{k}");
    }

    // Restore into a prefix: the same bytes, under <prefix>/attachments/.
    let r = restore_to(ctx, &tenant, restore_url, false).await.unwrap();
    assert_eq!(r.files, 5);
    assert_eq!(r.multipart_uploads, 1, "big.bin goes up in parts");
    let target = custos::source::object_store::open_url(restore_url, &ctx.s3).unwrap();
    let mut expected: Vec<_> = changed
        .iter()
        .map(|(k, v)| (format!("attachments/{k}"), v.clone()))
        .collect();
    expected.sort();
    let got = read_all(&target).await;
    assert_eq!(
        got.iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<Vec<_>>()
    );
    assert!(got == expected, "restored objects are byte-identical");
    // A non-empty target is refused without --overwrite.
    let err = restore_to(ctx, &tenant, restore_url, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    restore_to(ctx, &tenant, restore_url, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_prefix_backup_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Context::embedded(&tmp.path().join("custos")).unwrap();
    let src = tmp.path().join("bucket/acme");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    source_flow(
        &ctx,
        &format!("file://{}/", src.display()),
        &format!("file://{}/", out.display()),
        tmp.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_prefix_backup_and_restore() {
    if !common::strict() {
        eprintln!("skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx = Context::embedded(&tmp.path().join("custos")).unwrap();
    ctx.s3 = common::s3_options();
    let run = hex::encode(custos::util::random_bytes::<6>());
    let bucket = common::s3_bucket();
    source_flow(
        &ctx,
        &format!("s3://custos-attachments/{run}/acme/"),
        &format!("s3://{bucket}/restores/{run}/"),
        tmp.path(),
    )
    .await;
}

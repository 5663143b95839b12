//! End-to-end: init, backup, restore, incremental backup, check, on the
//! embedded setup (local store, local keys).

mod common;

use custos::TenantId;
use custos::context::Context;
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::pipeline::packer::PackerConfig;
use custos::repo::Repo;
use custos::source::Source;
use custos::store::lease::LeaseGuard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_incremental_check() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::make_tree(&data, 300);
    let ctx = Context::embedded(&tmp.path().join("custos")).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();
    let (repo, created) = Repo::init(&ctx, &tenant, &key, false).await.unwrap();
    assert!(created);
    let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "backup", ctx.lease_ttl)
        .await
        .unwrap();
    let opts = || jobs::backup::BackupOptions {
        sources: vec![Source::Path {
            name: "data".into(),
            path: data.clone(),
            exclude: vec![],
            one_file_system: false,
        }],
        packer: PackerConfig::default(),
        allow_unreadable: false,
        tags: vec![],
        force_read: false,
    };
    let t0 = std::time::Instant::now();
    let first = jobs::backup::run(&repo, &lease, opts(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(first.summary.files, 304);
    assert!(first.summary.bytes_stored > 3 << 20);

    eprintln!("first backup {:?}", t0.elapsed());
    let second = jobs::backup::run(&repo, &lease, opts(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(second.parent, Some(first.snapshot));
    assert_eq!(
        second.summary.files_read, 0,
        "unchanged files are not read again"
    );
    assert_eq!(second.summary.bytes_new, 0);
    assert!(
        second.summary.bytes_stored < 4096,
        "second backup stored {}",
        second.summary.bytes_stored
    );

    eprintln!("second backup {:?}", t0.elapsed());
    let snap = repo.find_snapshot("latest").await.unwrap();
    let target = tmp.path().join("restore");
    let opts_r = jobs::restore::RestoreOptions {
        target: target.clone(),
        include: vec![],
        overwrite: false,
    };
    let r = jobs::restore::run(&repo, &snap, &opts_r, &NoProgress)
        .await
        .unwrap();
    eprintln!("restore {:?}", t0.elapsed());
    assert_eq!(r.files, 304);
    common::assert_same(&data, &target.join("data"));
    // A second restore into the same target is refused without --overwrite.
    let again = jobs::restore::run(&repo, &snap, &opts_r, &NoProgress)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("not empty"), "{again}");

    let report = jobs::check::run(&repo, jobs::check::ReadData::All)
        .await
        .unwrap();
    eprintln!("check {:?}", t0.elapsed());
    assert!(report.ok(), "{:?}", report.faults);
    assert!(report.packs_read > 0);
    lease.release().await;
}

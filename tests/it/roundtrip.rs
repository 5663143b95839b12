//! End-to-end: init, backup, restore, incremental backup, check, on the
//! embedded setup (local store, local keys).

use crate::common;

use custos::TenantId;
use custos::context::Context;
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::repo::Repo;
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
    let opts = || common::backup_options(&data);
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

/// A file over 100 MiB (random, compressible and zero regions) round-trips
/// byte-identically, and an unchanged second backup stores almost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut big = vec![0u8; 101 << 20];
    custos::util::fill_random(&mut big[..40 << 20]);
    for (i, b) in big[40 << 20..80 << 20].iter_mut().enumerate() {
        *b = b"log line with some words 0123456789\n"[i % 36];
    }
    std::fs::write(data.join("big.bin"), &big).unwrap();
    drop(big);
    let ctx = Context::embedded(&tmp.path().join("custos")).unwrap();
    let tenant = TenantId::new("big").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &KeyRef::local("big").unwrap(), false)
        .await
        .unwrap();
    let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "backup", ctx.lease_ttl)
        .await
        .unwrap();
    let opts = || common::backup_options(&data);
    let first = jobs::backup::run(&repo, &lease, opts(), &NoProgress)
        .await
        .unwrap();
    assert!(
        first.summary.bytes_stored < 60 << 20,
        "compressible and zero regions shrink: {}",
        first.summary.bytes_stored
    );
    // Forcing a full re-read still stores nothing new: every chunk deduplicates.
    let mut again = opts();
    again.force_read = true;
    let second = jobs::backup::run(&repo, &lease, again, &NoProgress)
        .await
        .unwrap();
    assert_eq!(second.summary.files_read, 1);
    assert_eq!(second.summary.bytes_new, 0);
    assert!(
        second.summary.bytes_stored < 64 << 10,
        "{}",
        second.summary.bytes_stored
    );
    let snap = repo.find_snapshot("latest").await.unwrap();
    let target = tmp.path().join("restore");
    let opts_r = jobs::restore::RestoreOptions {
        target: target.clone(),
        include: vec![],
        overwrite: false,
    };
    jobs::restore::run(&repo, &snap, &opts_r, &NoProgress)
        .await
        .unwrap();
    common::assert_same(&data, &target.join("data"));
    // The zero tail was restored as a hole (sparse), not written.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(target.join("data/big.bin")).unwrap();
    // At least one whole 8 MiB zero chunk became a hole (chunks straddling the
    // region edges hold data and are written).
    assert!(
        m.blocks() * 512 <= m.len() - (8 << 20),
        "allocated {} of {}",
        m.blocks() * 512,
        m.len()
    );
    lease.release().await;
}

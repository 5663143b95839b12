//! End-to-end: init, backup, restore, incremental backup, check, on the
//! embedded setup (local store, local keys).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use custos::TenantId;
use custos::context::Context;
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::pipeline::packer::PackerConfig;
use custos::repo::Repo;
use custos::source::Source;
use custos::store::lease::LeaseGuard;

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("hello.txt"), "hello world\n".repeat(1000)).unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    let mut rnd = vec![0u8; 3 << 20];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("dir/random.bin"), &rnd).unwrap();
    for i in 0..300 {
        fs::write(root.join(format!("dir/sub/small-{i}")), format!("file {i}")).unwrap();
    }
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    let bad = std::ffi::OsStr::from_bytes(b"name-\xff\xfe");
    fs::write(root.join(bad), b"non-utf8").unwrap();
    fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
}

use std::os::unix::ffi::OsStrExt;

fn assert_same(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap();
    assert_eq!(ma.file_type(), mb.file_type(), "{}", a.display());
    if ma.is_file() {
        assert_eq!(
            fs::read(a).unwrap(),
            fs::read(b).unwrap(),
            "{}",
            a.display()
        );
    }
    if !ma.file_type().is_symlink() {
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "mode {}",
            a.display()
        );
        assert_eq!(ma.mtime(), mb.mtime(), "mtime {}", a.display());
        assert_eq!(
            ma.mtime_nsec(),
            mb.mtime_nsec(),
            "mtime_nsec {}",
            a.display()
        );
    } else {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
    }
    if ma.is_dir() {
        let mut names: Vec<_> = fs::read_dir(a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut names_b: Vec<_> = fs::read_dir(b)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names_b.sort();
        assert_eq!(names, names_b, "{}", a.display());
        for n in names {
            assert_same(&a.join(&n), &b.join(&n));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_incremental_check() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_tree(&data);
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
    assert_same(&data, &target.join("data"));
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

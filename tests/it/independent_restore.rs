//! docs/FORMAT.md is complete: scripts/independent-restore.py, written from the
//! spec alone (Python, no custos code), restores a custos backup byte-identically.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use custos::TenantId;
use custos::context::Context;
use custos::keys::KeyRef;
use custos::repo::Repo;

fn python() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("CUSTOS_TEST_PYTHON")?);
    p.exists().then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_alone_restores_a_backup() {
    let Some(py) = python() else {
        common::require(
            false,
            "CUSTOS_TEST_PYTHON (a python with cryptography, blake3 and zstandard)",
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::make_tree(&data, 50);
    let mut big = vec![0u8; 5 << 20];
    custos::util::fill_random(&mut big[..2 << 20]);
    std::fs::write(data.join("dir/big-half-zero.bin"), &big).unwrap();
    // Hard links (FORMAT.md §9), one of them across directories.
    std::fs::hard_link(data.join("hello.txt"), data.join("dir/hello-link")).unwrap();
    std::fs::hard_link(data.join("hello.txt"), data.join("hello-again")).unwrap();

    let root = tmp.path().join("custos");
    let ctx = Context::embedded(&root).unwrap();
    let tenant = TenantId::new("spec").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &KeyRef::local("spec").unwrap(), false)
        .await
        .unwrap();
    common::backup_dir(&ctx, &repo, &data).await;

    let target = tmp.path().join("restored");
    let out = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/independent-restore.py"
        ))
        .arg(root.join("store"))
        .arg(root.join("keys"))
        .arg("spec")
        .arg("latest")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "independent restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_same(&data, &target.join("data"));
    let ino =
        |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(target.join(p)).unwrap());
    assert_eq!(ino("data/hello.txt"), ino("data/dir/hello-link"));
    assert_eq!(ino("data/hello.txt"), ino("data/hello-again"));
}

/// A blob listed twice (its first pack lost, stored again by the next
/// backup): the spec says to read it from a listing whose pack exists, and
/// the independent reader does, whichever index file it meets first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_alone_restores_after_a_lost_pack_was_stored_again() {
    let Some(py) = python() else {
        common::require(
            false,
            "CUSTOS_TEST_PYTHON (a python with cryptography, blake3 and zstandard)",
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::make_tree(&data, 20);
    let root = tmp.path().join("custos");
    let ctx = Context::embedded(&root).unwrap();
    let tenant = TenantId::new("spec").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &KeyRef::local("spec").unwrap(), false)
        .await
        .unwrap();
    common::backup_dir(&ctx, &repo, &data).await;
    // Lose every pack: the second backup stores everything again, and every
    // blob is then listed twice, once in a pack that is gone.
    let packs = root.join("store/tenants/spec/packs");
    for dir in std::fs::read_dir(&packs).unwrap() {
        for p in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            std::fs::remove_file(p.unwrap().path()).unwrap();
        }
    }
    let report = common::backup_dir(&ctx, &repo, &data).await;
    assert!(report.summary.blobs_new > 0, "{report:?}");
    assert_eq!(
        std::fs::read_dir(root.join("store/tenants/spec/index"))
            .unwrap()
            .count(),
        2
    );

    let target = tmp.path().join("restored");
    let out = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/independent-restore.py"
        ))
        .arg(root.join("store"))
        .arg(root.join("keys"))
        .arg("spec")
        .arg("latest")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "independent restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_same(&data, &target.join("data"));
}

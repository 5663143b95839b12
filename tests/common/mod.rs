//! Helpers shared by the integration tests: test trees, tree comparison,
//! contexts and the CI gating of tests that need extra tools.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// True when the run must not skip anything (scripts/test.sh and CI set it).
pub fn strict() -> bool {
    std::env::var("CUSTOS_TEST_EMULATORS").is_ok_and(|v| v == "1")
}

/// Skips (locally) or fails (CI) when a test's prerequisite is missing.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if strict() {
        panic!("{what} is required when CUSTOS_TEST_EMULATORS=1 (scripts/test.sh sets it up)");
    }
    eprintln!("skipped: {what} is not available (scripts/test.sh sets it up)");
    false
}

/// A small mixed tree: text, random binary over several chunks, many small
/// files, a symlink, an empty file, an empty directory, a non-UTF-8 name,
/// unusual modes.
pub fn make_tree(root: &Path, small_files: usize) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("hello.txt"), "hello world\n".repeat(1000)).unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    let mut rnd = vec![0u8; 3 << 20];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("dir/random.bin"), &rnd).unwrap();
    for i in 0..small_files {
        fs::write(root.join(format!("dir/sub/small-{i}")), format!("file {i}")).unwrap();
    }
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::write(root.join(OsStr::from_bytes(b"name-\xff\xfe")), b"non-utf8").unwrap();
    fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
}

/// Asserts two trees are identical: types, contents, modes, mtimes (ns), link targets.
pub fn assert_same(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", a.display());
    if ma.file_type().is_symlink() {
        assert_eq!(
            fs::read_link(a).unwrap(),
            fs::read_link(b).unwrap(),
            "{}",
            a.display()
        );
        return;
    }
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        a.display()
    );
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {}",
        a.display()
    );
    if ma.is_file() {
        assert_eq!(ma.len(), mb.len(), "size of {}", a.display());
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "content of {}",
            a.display()
        );
    }
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut n: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            n.sort();
            n
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", a.display());
        for n in na {
            assert_same(&a.join(&n), &b.join(&n));
        }
    }
}

//! Restores stay beneath their target and are faithful (issue 12, items 3, 4
//! and the restore part of 11), through the binary:
//!
//! - a directory inside the target swapped for a symlink to an outside
//!   directory while the restore runs puts nothing outside;
//! - `--target link` and `--target link/` are refused alike; symlinks already
//!   inside the target are never followed;
//! - as root, owners of files, directories and symlinks and the
//!   setuid/setgid/sticky bits come back; without CAP_CHOWN, no set-id bit
//!   is given to a file whose owner could not be restored;
//! - hard links come back as hard links, also under `--include`;
//! - a restore that fails midway leaves no `.custos-*.tmp` behind.

use crate::common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::common::{Cli, Run};

fn restore(cli: &Cli, target: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["restore", "acme", "latest", "--json", "--target"];
    args.push(target.to_str().unwrap());
    args.extend_from_slice(extra);
    cli.run(&args)
}

fn error_kind(r: &Run) -> String {
    r.json()["error"]["kind"].as_str().unwrap_or("").to_owned()
}

/// Every path under `dir` (relative), symlinks not followed.
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_owned());
        }
    }
    out.sort();
    out
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    all_paths(dir)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".custos-") && n.ends_with(".tmp")
        })
        .collect()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The rename race of issue 12, item 3: while a restore of thousands of
/// files runs, another thread swaps `data/dir` inside the target for a
/// symlink to an outside directory and back, as fast as it can. Nothing may
/// land outside. The restore may fail (it meets the symlink when it comes
/// back to finish the directory) but never by writing through it, and it
/// leaves no temporary file.
#[test]
fn a_directory_swapped_for_a_symlink_mid_restore_gets_nothing_outside() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("dir")).unwrap();
    for i in 0..3000 {
        fs::write(
            data.join(format!("dir/f{i:05}")),
            format!("tenant data {i}\n"),
        )
        .unwrap();
    }
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);

    let outside = cli.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let staged = cli.path().join("staged-link");
    symlink(&outside, &staged).unwrap();
    let target = cli.path().join("target");
    let dir = target.join("data/dir");
    let aside = target.join("data/aside");

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (stop, swaps, dir, aside, staged) = (
            stop.clone(),
            swaps.clone(),
            dir.clone(),
            aside.clone(),
            staged.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // The real directory goes aside, the symlink takes its name ...
                if fs::rename(&dir, &aside).is_ok() {
                    if fs::rename(&staged, &dir).is_ok() {
                        swaps.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                        let _ = fs::rename(&dir, &staged);
                    }
                    // ... and both go back.
                    let _ = fs::rename(&aside, &dir);
                } else {
                    std::thread::yield_now();
                }
            }
        })
    };
    let r = restore(&cli, &target, &[]);
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!(
        "restore under the race: exit {}, {swaps} swaps, {}",
        r.code,
        if r.code == 0 {
            "ok".to_owned()
        } else {
            r.stdout.clone()
        }
    );
    assert!(swaps > 10, "the race ran ({swaps} swaps)");

    let escaped = all_paths(&outside);
    assert!(
        escaped.is_empty(),
        "{} entries written outside the target ({swaps} swaps), e.g. {:?}",
        escaped.len(),
        &escaped[..escaped.len().min(5)]
    );
    assert!(
        r.code == 0 || error_kind(&r) == "unsafe_target",
        "code {}: {}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    assert_eq!(temp_files(&target), Vec::<PathBuf>::new());
    // What was restored is the tenant's data, in the real directory.
    let restored = fs::read_dir(&dir).unwrap().count();
    if r.code == 0 {
        assert_eq!(restored, 3000);
    }
    for e in fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let i: usize = e.file_name().to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(
            fs::read_to_string(e.path()).unwrap(),
            format!("tenant data {i}\n")
        );
    }
}

/// The next try after the symlink: a directory of the restore moved aside
/// and another one (the attacker's) put in its place, once, while the
/// restore runs. The restore goes on filling the directory it created
/// (wherever it now is) and must not give the attacker's directory the
/// stored owner and mode when it finishes directories; it fails with
/// `unsafe_target` instead.
#[test]
fn a_directory_swapped_for_another_keeps_its_own_owner_and_mode() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("dir")).unwrap();
    for i in 0..3000 {
        fs::write(
            data.join(format!("dir/f{i:05}")),
            format!("tenant data {i}\n"),
        )
        .unwrap();
    }
    fs::set_permissions(data.join("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);

    let evil = cli.path().join("evil");
    fs::create_dir_all(&evil).unwrap();
    fs::set_permissions(&evil, fs::Permissions::from_mode(0o777)).unwrap();
    let evil_meta = fs::metadata(&evil).unwrap();
    let target = cli.path().join("target");
    let dir = target.join("data/dir");
    let aside = target.join("data/aside");
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (stop, dir, aside, evil) = (stop.clone(), dir.clone(), aside.clone(), evil.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if fs::rename(&dir, &aside).is_ok() {
                    fs::rename(&evil, &dir).unwrap();
                    return true;
                }
                std::thread::yield_now();
            }
            false
        })
    };
    let r = restore(&cli, &target, &[]);
    stop.store(true, Ordering::Relaxed);
    let swapped = attacker.join().unwrap();
    assert!(swapped, "the swap happened");
    let now = fs::metadata(&dir).unwrap();
    assert_eq!(
        now.ino(),
        evil_meta.ino(),
        "the attacker's directory is in place"
    );
    let planted: Vec<_> = fs::read_dir(&dir).unwrap().collect();
    assert!(
        planted.is_empty(),
        "{} tenant files written into the attacker's directory",
        planted.len()
    );
    assert_eq!(
        (now.mode() & 0o7777, now.uid(), now.gid()),
        (0o777, evil_meta.uid(), evil_meta.gid()),
        "the attacker's directory got the stored mode or owner"
    );
    if r.code != 0 {
        assert_eq!(error_kind(&r), "unsafe_target", "{}", r.stdout);
    }
    assert_eq!(temp_files(&target), Vec::<PathBuf>::new());
}

/// Without `--overwrite` the target must be empty, but that is checked once,
/// at the start. A directory made by someone else (who can write where it
/// goes) after that, at a name the restore then needs, was used as it was:
/// the restore filled it and finished it with the stored owner and mode,
/// together with whatever the other user had put in it. It is refused.
#[test]
fn a_directory_that_appears_mid_restore_is_not_used_without_overwrite() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("a")).unwrap();
    for i in 0..3000 {
        fs::write(data.join(format!("a/f{i:05}")), format!("{i}\n")).unwrap();
    }
    fs::create_dir_all(data.join("z")).unwrap();
    fs::write(data.join("z/f"), "tenant\n").unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let mut planted_runs = 0;
    for attempt in 0..5 {
        let target = cli.path().join(format!("target{attempt}"));
        let z = target.join("data/z");
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let (stop, z) = (stop.clone(), z.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if fs::create_dir(&z).is_ok() {
                        fs::write(z.join("planted"), "not the tenant's").unwrap();
                        return true;
                    }
                    std::thread::yield_now();
                }
                false
            })
        };
        let r = restore(&cli, &target, &[]);
        stop.store(true, Ordering::Relaxed);
        let planted = attacker.join().unwrap();
        if !planted {
            assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
            continue;
        }
        planted_runs += 1;
        assert_eq!(
            error_kind(&r),
            "unsafe_target",
            "the restore used a directory it did not make: code {}, {}",
            r.code,
            r.stdout
        );
        assert!(
            r.stdout.contains("appeared while restoring"),
            "{}",
            r.stdout
        );
        assert!(!z.join("f").exists(), "nothing restored into it");
        assert_eq!(temp_files(&target), Vec::<PathBuf>::new());
        break;
    }
    assert!(planted_runs > 0, "the race never ran");
}

/// Issue 12, item 3: `--target link/` followed the symlink that `--target
/// link` is refused for. Both are refused, as are `link/.` and `link//`,
/// with `unsafe_target`, and nothing is written where the link points. A
/// symlink among the target's parents is the operator's own path and is
/// followed.
#[test]
fn a_symlinked_target_is_refused_with_or_without_a_trailing_slash() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let real = cli.path().join("real");
    fs::create_dir_all(&real).unwrap();
    let link = cli.path().join("link");
    symlink(&real, &link).unwrap();
    let base = link.to_str().unwrap();
    for given in [
        format!("{base}/"),
        format!("{base}//"),
        format!("{base}/."),
        base.to_owned(),
    ] {
        let r = restore(&cli, Path::new(&given), &["--overwrite"]);
        assert_eq!(
            all_paths(&real),
            Vec::<PathBuf>::new(),
            "{given}: restored through the link"
        );
        assert_eq!(r.code, 1, "{given}: {}", r.stdout);
        assert_eq!(error_kind(&r), "unsafe_target", "{given}: {}", r.stdout);
        assert!(r.stdout.contains("is a symlink"), "{given}: {}", r.stdout);
    }
    // Through a symlinked parent: restored, into the real directory.
    let r = restore(&cli, &link.join("sub"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    common::assert_same(&data, &real.join("sub/data"));
}

/// Restoring over an existing tree (`--overwrite`): a symlink where a
/// directory of the snapshot goes is refused, never followed, whatever it
/// points to; a symlink where a file goes is replaced by the file, and what
/// it pointed to is left alone.
#[test]
fn symlinks_already_in_the_target_are_never_followed() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let outside = cli.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("precious"), "not the tenant's").unwrap();

    // Where a directory goes: at the top of the snapshot and deeper down.
    for planted in ["data", "data/dir", "data/dir/sub"] {
        let target = cli.path().join(format!("t-{}", planted.replace('/', "-")));
        fs::create_dir_all(target.join(planted).parent().unwrap()).unwrap();
        symlink(&outside, target.join(planted)).unwrap();
        let r = restore(&cli, &target, &["--overwrite"]);
        assert_eq!(r.code, 1, "{planted}: {}", r.stdout);
        assert_eq!(error_kind(&r), "unsafe_target", "{planted}: {}", r.stdout);
        assert!(r.stdout.contains("exists as a symlink"), "{}", r.stdout);
        assert_eq!(
            all_paths(&outside),
            [PathBuf::from("precious")],
            "{planted}"
        );
        assert_eq!(temp_files(&target), Vec::<PathBuf>::new());
    }

    // Where a file goes: the link itself is replaced.
    let target = cli.path().join("t-file");
    fs::create_dir_all(target.join("data")).unwrap();
    symlink(outside.join("precious"), target.join("data/hello.txt")).unwrap();
    let r = restore(&cli, &target, &["--overwrite"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(
        fs::read_to_string(outside.join("precious")).unwrap(),
        "not the tenant's"
    );
    assert!(
        fs::symlink_metadata(target.join("data/hello.txt"))
            .unwrap()
            .is_file()
    );
    common::assert_same(&data, &target.join("data"));
}

/// Issue 12, item 4, as root: setuid, setgid and sticky bits and the owners
/// of files, directories and symlinks come back (before, a chown after the
/// chmod cleared setuid/setgid, and directories and symlinks came back owned
/// by root).
#[test]
fn root_restores_keep_owners_and_setuid_setgid_sticky_bits() {
    if !is_root() {
        // CI runs as root; an ordinary user cannot create such files.
        eprintln!("skipped: needs root");
        return;
    }
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("shared/tmp")).unwrap();
    fs::create_dir_all(data.join("home")).unwrap();
    let entries: &[(&str, u32, u32, Option<u32>)] = &[
        // path, uid, gid, mode (None: symlink)
        ("bin-suid", 0, 0, Some(0o4755)),
        ("bin-suid-user", 4242, 4343, Some(0o4750)),
        ("bin-sgid", 4242, 4343, Some(0o2755)),
        ("both", 4242, 4343, Some(0o6711)),
        ("plain", 4244, 4345, Some(0o640)),
        ("shared", 4242, 4343, Some(0o2775)),
        ("shared/tmp", 4246, 4347, Some(0o1777)),
        ("home", 4248, 4349, Some(0o700)),
        ("home/link", 4248, 4349, None),
        ("link-root-dir", 4250, 4351, None),
    ];
    for (path, uid, gid, mode) in entries {
        let p = data.join(path);
        match mode {
            None => symlink("../plain", &p).unwrap(),
            Some(_) if p.is_dir() => {}
            Some(_) => fs::write(&p, format!("#!/bin/sh\necho {path}\n")).unwrap(),
        }
        std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid)).unwrap();
        if let Some(mode) = mode {
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        }
    }
    fs::set_permissions(&data, fs::Permissions::from_mode(0o3755)).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let target = cli.path().join("r");
    let r = restore(&cli, &target, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let restored = target.join("data");
    common::assert_same(&data, &restored);
    let mut checked = 0;
    for rel in std::iter::once(PathBuf::new()).chain(all_paths(&data)) {
        let (a, b) = (
            fs::symlink_metadata(data.join(&rel)).unwrap(),
            fs::symlink_metadata(restored.join(&rel)).unwrap(),
        );
        assert_eq!(
            (a.uid(), a.gid()),
            (b.uid(), b.gid()),
            "owner of {}",
            rel.display()
        );
        if !a.file_type().is_symlink() {
            assert_eq!(
                a.mode() & 0o7777,
                b.mode() & 0o7777,
                "mode of {}",
                rel.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, entries.len() + 1);
}

/// As root without CAP_CHOWN (or on an NFS export that squashes root), owners
/// cannot be set: the restore warns once, goes on, and does not put
/// setuid/setgid bits on files it could not give their owner.
#[test]
fn root_without_chown_restores_without_owners_or_set_id_bits() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root and setpriv (util-linux)");
        return;
    }
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("shared")).unwrap();
    fs::write(data.join("tool"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::lchown(data.join("tool"), Some(4242), Some(4343)).unwrap();
    fs::set_permissions(data.join("tool"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::write(data.join("plain"), "x").unwrap();
    fs::set_permissions(data.join("plain"), fs::Permissions::from_mode(0o640)).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let target = cli.path().join("r");
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--bounding-set", "-chown", "--"])
        .arg(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(cli.path().join("custos.toml"))
        .args(["restore", "acme", "latest", "--target"])
        .arg(&target)
        .env("CUSTOS_LOG", "warn")
        .env("CUSTOS_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("restore.owners_not_restored").count(),
        1,
        "warned once: {stderr}"
    );
    let tool = fs::metadata(target.join("data/tool")).unwrap();
    assert_eq!(
        tool.mode() & 0o7777,
        0o755,
        "no set-id bits without the owner"
    );
    assert_eq!((tool.uid(), tool.gid()), (0, 0));
    assert_eq!(
        fs::metadata(target.join("data/plain")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(fs::read(target.join("data/tool")).unwrap(), b"#!/bin/sh\n");
}

/// Not root, owners are not restored: a setuid or setgid file from the
/// tenant's source would come back set-id to the user custos runs as (who
/// can read every tenant's keys), runnable by anyone who can reach it. Files
/// come back without set-id bits; other bits (sticky on a directory) stay.
#[test]
fn a_non_root_restore_gives_no_set_id_bits() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root (to hand the installation to a user) and setpriv");
        return;
    }
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("shared")).unwrap();
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("both", 0o6711)] {
        fs::write(data.join(name), "#!/bin/sh\nid\n").unwrap();
        fs::set_permissions(data.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(data.join("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    // The whole installation (config, keys, state, store) belongs to the
    // unprivileged user custos runs as.
    let chown = std::process::Command::new("chown")
        .args(["-R", "4242:4242"])
        .arg(cli.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let target = cli.path().join("r");
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=4242", "--regid=4242", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(cli.path().join("custos.toml"))
        .args(["restore", "acme", "latest", "--target"])
        .arg(&target)
        .env("CUSTOS_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for (name, mode) in [("suid", 0o755), ("sgid", 0o755), ("both", 0o711)] {
        let m = fs::metadata(target.join("data").join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4242), "{name}");
        assert_eq!(
            m.mode() & 0o7777,
            mode,
            "{name}: no set-id bit for the restoring user"
        );
    }
    assert_eq!(
        fs::metadata(target.join("data/shared")).unwrap().mode() & 0o7777,
        0o1777
    );
}

/// Issue 12, item 4: hard links came back as separate copies. They are
/// recorded at backup (read once), restored as links, also across
/// directories; under `--include` the first selected name of a group gets
/// the content and the other selected names link to it; a drill and
/// `check --read-data` pass.
/// A restore of many batches (`CUSTOS_RESTORE_BATCH_FILES=3`: each batch's
/// pack reads run while the next is created): hard links whose first name is
/// in an earlier batch are linked once it is in place, everything restores
/// identically; a pack that fails to verify mid-restore fails it naming the
/// pack, and no temporary file of any batch is left behind.
#[test]
fn a_restore_of_many_overlapping_batches_links_across_them_and_fails_cleanly() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("d")).unwrap();
    for i in 0..40 {
        let mut content = vec![0u8; 1000 + i * 300];
        custos::util::fill_random(&mut content);
        fs::write(data.join(format!("d/f{i:02}")), &content).unwrap();
    }
    // First names early in the tree, later names many batches on.
    fs::hard_link(data.join("d/f00"), data.join("z-link-0")).unwrap();
    fs::hard_link(data.join("d/f05"), data.join("z-link-5")).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let many = [("CUSTOS_RESTORE_BATCH_FILES", "3")];

    let target = cli.path().join("t");
    let t = target.to_str().unwrap();
    let r = cli.run_env(
        &["restore", "acme", "latest", "--target", t, "--json"],
        &many,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["result"]["hardlinks"], 2, "{}", r.stdout);
    common::assert_same(&data, &target.join("data"));
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    let t_data = target.join("data");
    assert_eq!(ino(&t_data.join("d/f00")), ino(&t_data.join("z-link-0")));
    assert_eq!(ino(&t_data.join("d/f05")), ino(&t_data.join("z-link-5")));

    // Every pack damaged: the first batch's reads fail while others queue.
    for pack in cli.object_paths("acme", "packs") {
        let mut bytes = fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        fs::write(&pack, bytes).unwrap();
    }
    let broken = cli.path().join("broken");
    let b = broken.to_str().unwrap();
    let r = cli.run_env(
        &["restore", "acme", "latest", "--target", b, "--json"],
        &many,
    );
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert_eq!(error_kind(&r), "corrupt_object", "{}", r.stdout);
    let leftovers: Vec<_> = common::files_under(&broken)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".custos-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn hard_links_are_restored_as_hard_links() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("sub")).unwrap();
    let mut big = vec![0u8; 2 << 20];
    custos::util::fill_random(&mut big);
    fs::write(data.join("a"), &big).unwrap();
    fs::hard_link(data.join("a"), data.join("b")).unwrap();
    fs::hard_link(data.join("a"), data.join("sub/c")).unwrap();
    // A group whose first name (in tree order) is deeper than the other.
    fs::write(data.join("sub/y"), "second group").unwrap();
    fs::hard_link(data.join("sub/y"), data.join("x")).unwrap();
    // A file whose other name is outside the source.
    fs::write(data.join("solo"), "linked from outside").unwrap();
    fs::hard_link(data.join("solo"), cli.path().join("outside-name")).unwrap();
    fs::set_permissions(data.join("a"), fs::Permissions::from_mode(0o751)).unwrap();
    cli.policy("acme", &data);
    let r = cli.ok(&["backup", "acme", "--json"]);
    let summary = r.json()["result"]["summary"].clone();
    assert_eq!(summary["files"], 6, "{summary}");
    assert_eq!(summary["files_read"], 3, "each inode read once: {summary}");

    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    let nlink = |p: &Path| fs::metadata(p).unwrap().nlink();

    let target = cli.path().join("full");
    let r = restore(&cli, &target, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let report = r.json()["result"].clone();
    assert_eq!(
        (report["files"].as_u64(), report["hardlinks"].as_u64()),
        (Some(6), Some(3)),
        "{report}"
    );
    let t = target.join("data");
    common::assert_same(&data, &t);
    assert_eq!(ino(&t.join("a")), ino(&t.join("b")));
    assert_eq!(ino(&t.join("a")), ino(&t.join("sub/c")));
    assert_eq!(nlink(&t.join("a")), 3);
    assert_eq!(ino(&t.join("x")), ino(&t.join("sub/y")));
    assert_eq!(nlink(&t.join("x")), 2);
    assert_eq!(nlink(&t.join("solo")), 1);
    assert_eq!(fs::read(t.join("sub/c")).unwrap(), big);

    // Only a later name of a group selected: restored with its content.
    let only_c = cli.path().join("only-c");
    let r = restore(&cli, &only_c, &["--include", "data/sub/c"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(fs::read(only_c.join("data/sub/c")).unwrap(), big);
    assert_eq!(nlink(&only_c.join("data/sub/c")), 1);
    assert!(!only_c.join("data/a").exists());
    assert_eq!(
        fs::metadata(only_c.join("data/sub/c")).unwrap().mode() & 0o7777,
        0o751
    );

    // Two later names selected, not the first: the first selected one gets
    // the content, the other links to it.
    let some = cli.path().join("some");
    let r = restore(
        &cli,
        &some,
        &["--include", "data/b", "--include", "data/sub"],
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    let s = some.join("data");
    assert!(!s.join("a").exists() && !s.join("x").exists());
    assert_eq!(fs::read(s.join("b")).unwrap(), big);
    assert_eq!(ino(&s.join("b")), ino(&s.join("sub/c")));
    assert_eq!(nlink(&s.join("b")), 2);
    assert_eq!(nlink(&s.join("sub/y")), 1);

    // Restoring over the restored tree keeps the links.
    let r = restore(&cli, &target, &["--overwrite"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(ino(&t.join("a")), ino(&t.join("sub/c")));
    assert_eq!(nlink(&t.join("a")), 3);
    assert_eq!(temp_files(&target), Vec::<PathBuf>::new());

    cli.ok(&["check", "acme", "--read-data"]);
    let r = cli.ok(&["drill", "acme", "--full", "--json"]);
    assert_eq!(r.json()["result"]["files_verified"], 6, "{}", r.stdout);
}

/// Issue 12, item 11 (restore part): a restore that fails midway leaves no
/// `.custos-*.tmp` in the target, whether it fails putting files in place
/// (a directory where a file goes) or reading a pack (one corrupted).
#[test]
fn a_failed_restore_leaves_no_temporary_files() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        let mut b = vec![0u8; 7 << 20];
        custos::util::fill_random(&mut b);
        fs::write(data.join(format!("big{i}")), b).unwrap();
    }
    for i in 0..200 {
        fs::write(data.join(format!("s{i:03}")), format!("small {i}\n")).unwrap();
    }
    symlink("s000", data.join("t-link")).unwrap();
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);

    // A directory where a file of the batch goes: the files of the batch
    // after it were left under their temporary names.
    let target = cli.path().join("dir-in-the-way");
    fs::create_dir_all(target.join("data/s050")).unwrap();
    let r = restore(&cli, &target, &["--overwrite"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stdout.contains("exists and is a directory"),
        "{}",
        r.stdout
    );
    assert_eq!(temp_files(&target), Vec::<PathBuf>::new());

    // A corrupted pack: the files waiting for it are removed.
    let packs = cli.object_paths("acme", "packs");
    assert!(packs.len() >= 2, "{packs:?}");
    let victim = packs.last().unwrap();
    let mut bytes = fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(victim, bytes).unwrap();
    let target = cli.path().join("corrupt-pack");
    let r = restore(&cli, &target, &[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(error_kind(&r), "corrupt_object", "{}", r.stdout);
    assert_eq!(temp_files(&target), Vec::<PathBuf>::new());
    // Whatever was put in place is complete.
    for p in all_paths(&target.join("data")) {
        let restored = target.join("data").join(&p);
        if fs::symlink_metadata(&restored).unwrap().is_file() {
            assert_eq!(
                fs::read(&restored).unwrap(),
                fs::read(data.join(&p)).unwrap()
            );
        }
    }
}

//! Hostile or unusual input on the machine being backed up: invalid cron
//! expressions, files that cannot be read (even by root), files changing or
//! vanishing mid-backup, huge sparse files, fifos and sockets, paths near
//! PATH_MAX, and a restore onto a full disk. Each case asserts the exact
//! outcome (error kind, or what is skipped and counted) and, where the run
//! fails, that the store is unchanged.
//!
//! Some cases need to mount (a bind mount, a small tmpfs): the tests run as
//! root here and in CI. Where mounting is not permitted they print why and
//! skip.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::Cli;

fn backup_json(cli: &Cli, tenant: &str) -> serde_json::Value {
    let r = cli.run(&["backup", tenant, "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json()
}

/// A mount that is undone on drop (also when the test fails).
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        let out = Command::new("mount").args(args).arg(at).output().ok()?;
        if out.status.success() {
            Some(Mount(at.to_owned()))
        } else {
            eprintln!(
                "skipped: cannot mount ({}): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn objects_without_locks(cli: &Cli, tenant: &str) -> BTreeMap<String, Vec<u8>> {
    cli.objects(tenant)
}

#[test]
fn invalid_cron_expressions_are_refused_with_file_and_line() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let cases = [
        "61 * * * *",
        "* * * *",
        "*/0 * * * *",
        "0 0 31 2 *",
        "@fortnightly",
        "0 25 * * *",
        "",
    ];
    for (i, cron) in cases.iter().enumerate() {
        fs::write(
            cli.path().join(format!("policies/t{i}.toml")),
            format!(
                "tenant = \"t{i}\"\nkey = \"local:t{i}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\n[backup]\nschedule = \"{cron}\"\n",
                data.display()
            ),
        )
        .unwrap();
    }
    let dir = cli.path().join("policies");
    let r = cli.run(&["policy", "validate", dir.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let report = r.json();
    let errors = report["result"]["errors"]
        .as_array()
        .or_else(|| report["errors"].as_array())
        .unwrap_or_else(|| panic!("errors in {report}"))
        .clone();
    for (i, cron) in cases.iter().enumerate() {
        let file = format!("t{i}.toml");
        let e = errors
            .iter()
            .find(|e| e.to_string().contains(&file))
            .unwrap_or_else(|| panic!("no error for {cron:?} ({file}): {report}"));
        let text = e.to_string();
        assert!(text.contains("schedule"), "{cron:?}: {text}");
        assert!(
            text.contains("\"line\":7") || text.contains(":7"),
            "{cron:?}: the error names line 7: {text}"
        );
    }
    // A backup of such a tenant is refused too, before anything is stored.
    let r = cli.run(&["backup", "t0", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["error"]["kind"], "invalid_policy", "{}", r.stdout);
    assert!(!cli.store().join("tenants").exists(), "nothing stored");
}

/// As root, permissions do not make a file unreadable. A file bind-mounted
/// from `/proc/<gone pid>/mem` is: opening or reading it fails (ESRCH) for
/// everyone. Without `allow_unreadable` the backup fails naming the file and
/// stores no snapshot; with it the file is skipped and counted.
#[test]
fn unreadable_files_fail_the_backup_or_are_skipped_and_counted() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let victim = data.join("aaa-unreadable");
    fs::write(&victim, b"").unwrap();
    let Some(_mount) = Mount::new(&["--bind", "/proc/self/mem"], &victim) else {
        return;
    };
    assert!(
        fs::read(&victim).is_err(),
        "the file is unreadable, even for root"
    );
    let before = objects_without_locks(&cli, "acme");
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "source_error", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("aaa-unreadable") && msg.contains("allow_unreadable"),
        "{msg}"
    );
    assert_eq!(
        before,
        objects_without_locks(&cli, "acme"),
        "store unchanged"
    );
    // With allow_unreadable: skipped, counted, warned about.
    let policy = cli.path().join("policies/acme.toml");
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str("[backup]\nallow_unreadable = true\n");
    fs::write(&policy, text).unwrap();
    let j = backup_json(&cli, "acme");
    let summary = &j["result"]["summary"];
    assert_eq!(summary["unreadable"], 1, "{j}");
    assert!(
        j["result"]["warnings"]
            .to_string()
            .contains("aaa-unreadable"),
        "{j}"
    );
    cli.ok(&["check", "acme", "--read-data"]);
}

/// A large file appended to while it is read, and files removed while the
/// walk runs: the backup succeeds, stores what it read (consistently),
/// warns, and the snapshot checks and restores.
#[test]
fn files_changing_or_vanishing_during_the_backup() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(data.join("many")).unwrap();
    let mut big = vec![0u8; 48 << 20];
    custos::util::fill_random(&mut big);
    fs::write(data.join("big.log"), &big).unwrap();
    for i in 0..3000 {
        fs::write(data.join(format!("many/f{i:05}")), format!("{i}")).unwrap();
    }
    cli.policy("acme", &data);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let data = data.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(data.join("big.log"))
                .unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&[b'x'; 4096]).unwrap();
                // Remove files from the end of the walk, while it runs.
                let _ = fs::remove_file(data.join(format!("many/f{:05}", 2999 - i % 3000)));
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let r = cli.run(&["backup", "acme", "--json"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    let warnings = j["result"]["warnings"].to_string();
    assert!(
        warnings.contains("big.log: changed while being read"),
        "{warnings}"
    );
    cli.ok(&["check", "acme", "--read-data"]);
    let target = cli.path().join("r");
    cli.restore_latest("acme", &target);
    // What was stored is a prefix of the file as it grew: consistent bytes.
    let restored = fs::read(target.join("data/big.log")).unwrap();
    assert!(restored.len() >= big.len());
    assert!(restored[..big.len()] == big[..]);
    assert!(restored[big.len()..].iter().all(|&b| b == b'x'));
}

/// A local user who can write in the source races the walk: directories
/// renamed away and replaced by symlinks out of the tree, files exchanged
/// with symlinks to a secret outside it. Whatever the timing, no byte from
/// outside reaches a snapshot: the walk holds directory handles and opens
/// files beneath them without following symlinks (a symlink is stored as a
/// symlink). Racy by nature, so it runs several backups; it cannot pass by
/// luck when the walk follows a swapped symlink, only fail to catch it.
#[test]
fn symlinks_and_renames_racing_the_backup_never_lead_outside() {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use std::os::unix::fs::symlink;
    let cli = Cli::new();
    let data = cli.path().join("data");
    let outside = cli.path().join("outside");
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("secret"), "OUTSIDE").unwrap();
    fs::write(outside.join("dir/secret"), "OUTSIDE").unwrap();
    for d in 0..16 {
        fs::create_dir_all(data.join(format!("d{d:02}"))).unwrap();
        for f in 0..200 {
            fs::write(data.join(format!("d{d:02}/f{f:03}")), "inside").unwrap();
        }
        symlink(outside.join("secret"), data.join(format!("d{d:02}/link"))).unwrap();
        symlink(outside.join("dir"), data.join(format!("x{d:02}"))).unwrap();
    }
    cli.policy("acme", &data);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let racer = {
        let (stop, data) = (stop.clone(), data.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let d = data.join(format!("d{:02}", i % 16));
                let f = d.join(format!("f{:03}", (i * 7) % 200));
                // A file and a symlink out, exchanged and back.
                let _ = renameat_with(CWD, &f, CWD, d.join("link"), RenameFlags::EXCHANGE);
                let _ = renameat_with(CWD, &f, CWD, d.join("link"), RenameFlags::EXCHANGE);
                // The directory and a symlink out, exchanged and back.
                let x = data.join(format!("x{:02}", i % 16));
                let _ = renameat_with(CWD, &d, CWD, &x, RenameFlags::EXCHANGE);
                let _ = renameat_with(CWD, &d, CWD, &x, RenameFlags::EXCHANGE);
                let aside = data.join("aside");
                let _ = fs::rename(&d, &aside);
                let _ = symlink(outside.join("dir"), &d);
                let _ = fs::remove_file(&d);
                let _ = fs::rename(&aside, &d);
                i += 1;
            }
        })
    };
    let mut snapshots = 0;
    for _ in 0..4 {
        let r = cli.run(&["backup", "acme", "--json"]);
        if r.code == 0 {
            snapshots += 1;
        } else {
            // Only a tree changing under the walk may fail it, and by name.
            assert!(r.stderr.contains("source"), "{}\n{}", r.stdout, r.stderr);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    racer.join().unwrap();
    assert!(
        snapshots > 0,
        "no backup completed while the tree was raced"
    );
    let target = cli.path().join("r");
    cli.restore_latest("acme", &target);
    // Every regular file restored holds what the tree held (symlinks are
    // symlinks, never followed here either).
    let mut files = 0;
    let mut stack = vec![target.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let content = fs::read(e.path()).unwrap();
                assert_eq!(content, b"inside", "{}", e.path().display());
                files += 1;
            }
        }
    }
    assert!(files > 0);
}

/// A sparse file (default 1 GiB; `CUSTOS_SPARSE_GIB=10` for the figures in
/// docs/reliability.md): stored as one deduplicated zero chunk, restored
/// sparse (holes are not written).
#[test]
fn sparse_files_are_stored_small_and_restored_sparse() {
    let gib: u64 = std::env::var("CUSTOS_SPARSE_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let f = fs::File::create(data.join("sparse.img")).unwrap();
    f.set_len(gib << 30).unwrap();
    // A little real data in the middle.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = f;
        f.seek(SeekFrom::Start((gib << 30) / 2)).unwrap();
        f.write_all(b"data in the middle of nowhere").unwrap();
    }
    cli.policy("acme", &data);
    let t = Instant::now();
    let j = backup_json(&cli, "acme");
    let backup_s = t.elapsed().as_secs_f64();
    let stored = j["result"]["summary"]["bytes_stored"].as_u64().unwrap();
    assert!(
        stored < 1 << 20,
        "a sparse {gib} GiB file stores {stored} bytes"
    );
    let target = cli.path().join("r");
    let t = Instant::now();
    cli.restore_latest("acme", &target);
    let restore_s = t.elapsed().as_secs_f64();
    let m = fs::metadata(target.join("data/sparse.img")).unwrap();
    assert_eq!(m.len(), gib << 30);
    let allocated = m.blocks() * 512;
    assert!(
        allocated < 16 << 20,
        "restored sparse: {allocated} bytes allocated"
    );
    eprintln!(
        "sparse {gib} GiB: backup {backup_s:.1} s, restore {restore_s:.1} s, {stored} bytes stored, {allocated} bytes allocated after restore"
    );
}

/// Fifos and sockets are skipped and counted, never opened (a fifo would block).
#[test]
fn fifos_and_sockets_are_skipped_and_counted() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("file"), "x").unwrap();
    let status = Command::new("mkfifo")
        .arg(data.join("fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let _sock = std::os::unix::net::UnixListener::bind(data.join("sock")).unwrap();
    cli.policy("acme", &data);
    let j = backup_json(&cli, "acme");
    assert_eq!(j["result"]["summary"]["skipped_special"], 2, "{j}");
    assert_eq!(j["result"]["summary"]["files"], 1, "{j}");
    let target = cli.path().join("r");
    cli.restore_latest("acme", &target);
    let names: Vec<_> = fs::read_dir(target.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["file"]);
}

/// Names of 255 bytes (NAME_MAX) nested until the path nears PATH_MAX
/// (4096): backed up and restored identically, under a restore target that
/// makes the full path longer than PATH_MAX.
#[test]
fn names_of_255_bytes_and_paths_near_path_max() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    // Build the deep tree relative to its root (an absolute path that long
    // cannot be passed to the kernel in one piece).
    let mut rel = PathBuf::new();
    let mut depth = 0;
    while data.join(&rel).as_os_str().len() + 2 * 256 < 4060 {
        let name = format!("{depth:03}{}", "d".repeat(252));
        assert_eq!(name.len(), 255);
        rel.push(name);
        depth += 1;
    }
    let status = Command::new("mkdir")
        .arg("-p")
        .arg(&rel)
        .current_dir(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let leaf = rel.join("f".repeat(255));
    let status = Command::new("sh")
        .arg("-c")
        .arg("printf deep > \"$1\"")
        .arg("sh")
        .arg(&leaf)
        .current_dir(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let full = data.join(&leaf).as_os_str().len();
    assert!(full > 3500, "path of {full} bytes");
    cli.policy("acme", &data);
    let j = backup_json(&cli, "acme");
    assert_eq!(j["result"]["summary"]["files"], 1, "{j}");
    cli.ok(&["check", "acme", "--read-data"]);
    // Restored under a short target: identical.
    let target = cli.path().join("r");
    cli.restore_latest("acme", &target);
    let out = Command::new("cat")
        .arg(&leaf)
        .current_dir(target.join("data"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "deep");
    // Under a target deep enough that target + path exceeds PATH_MAX, restore
    // works too: every entry is created relative to a handle of its
    // directory, so no path handed to the kernel is longer than one name
    // (see docs/reliability.md).
    let deep = cli.path().join("t".repeat(200)).join("u".repeat(200));
    assert!(deep.join("data").as_os_str().len() + leaf.as_os_str().len() > 4096);
    cli.restore_latest("acme", &deep);
    let out = Command::new("cat")
        .arg(&leaf)
        .current_dir(deep.join("data"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "deep");
}

/// A restore onto a full disk (a 5 MiB tmpfs) fails with
/// `insufficient_space`, exits non-zero, leaves no partial file behind and
/// changes nothing in the store.
#[test]
fn restore_onto_a_full_disk() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    for i in 0..3 {
        let mut b = vec![0u8; 3 << 20];
        custos::util::fill_random(&mut b);
        fs::write(data.join(format!("r{i}.bin")), b).unwrap();
    }
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let disk = cli.path().join("small-disk");
    fs::create_dir_all(&disk).unwrap();
    let Some(_mount) = Mount::new(&["-t", "tmpfs", "-o", "size=5m", "tmpfs"], &disk) else {
        return;
    };
    let before = cli.objects("acme");
    let target = disk.join("r");
    let r = cli.run(&[
        "restore",
        "acme",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "insufficient_space", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("No space left"),
        "{e}"
    );
    // No partial file: whatever remains is complete and correct.
    let mut stack = vec![target.clone()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for entry in rd {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let original = data.join(&name);
            assert!(
                original.exists(),
                "a temporary or partial file was left: {}",
                p.display()
            );
            assert!(
                fs::read(&p).unwrap() == fs::read(&original).unwrap(),
                "{} is partial",
                p.display()
            );
        }
    }
    assert_eq!(before, cli.objects("acme"), "store unchanged");
}

/// A policy for `acme` backing up `data`, with `extra` TOML appended.
fn policy_with(cli: &Cli, data: &Path, extra: &str) {
    fs::write(
        cli.path().join("policies/acme.toml"),
        format!(
            "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n{extra}",
            data.display()
        ),
    )
    .unwrap();
}

/// Issue 12, case 9: `keep_within = "300000years"` passed validation, then
/// `forget` panicked (`DateTime - TimeDelta overflowed`, exit 101) holding
/// the tenant's lease, so the next backup failed with `lease_contended`.
/// Now validation refuses it, naming the field, and nothing is held.
#[test]
fn keep_within_of_300000_years_is_refused_by_validate_and_forget() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    policy_with(&cli, &data, "[retention]\nkeep_last = 2\n");
    cli.ok(&["backup", "acme"]);
    let before = cli.objects("acme");

    policy_with(
        &cli,
        &data,
        "[retention]\nkeep_last = 2\nkeep_within = \"300000years\"\n",
    );
    let v = cli.run(&["policy", "validate"]);
    assert_eq!(v.code, 1, "{}\n{}", v.stdout, v.stderr);
    let shown = format!("{}{}", v.stdout, v.stderr);
    assert!(
        shown.contains("acme.toml:9:15: retention.keep_within: invalid duration \"300000years\": longer than 1000 years"),
        "{shown}"
    );
    for args in [
        &["forget", "acme", "--json"][..],
        &["forget", "acme", "--prune", "--json"][..],
    ] {
        let f = cli.run(args);
        assert_eq!(f.code, 1, "{args:?}: {}\n{}", f.stdout, f.stderr);
        let e = f.json()["error"].clone();
        assert_eq!(e["kind"], "invalid_policy", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("retention.keep_within"),
            "{e}"
        );
    }
    assert_eq!(before, cli.objects("acme"), "nothing changed");

    // No lease was left behind: with the policy fixed, every job runs.
    policy_with(&cli, &data, "[retention]\nkeep_last = 2\n");
    cli.ok(&["backup", "acme"]);
    cli.ok(&["forget", "acme", "--prune"]);
    cli.ok(&["check", "acme"]);
}

/// The same class everywhere a duration is taken: every duration of a
/// policy, of custos.toml and of the command line is range-checked (at most
/// 1000 years) with an error naming it, and nothing runs.
#[test]
fn every_duration_out_of_range_is_refused_with_its_name() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    for (extra, field) in [
        (
            "[retention]\nkeep_within = \"300000years\"\n",
            "retention.keep_within",
        ),
        ("[drill]\nwithin = \"1001years\"\n", "drill.within"),
        ("[drill]\nrto = \"300000years\"\n", "drill.rto"),
        (
            "[drill]\nverify_timeout = \"99999999999999d\"\n",
            "drill.verify_timeout",
        ),
        (
            "[rotation]\ncmk_every = \"300000years\"\n",
            "rotation.cmk_every",
        ),
        (
            "[rotation]\nepoch_every = \"18446744073709551615s\"\n",
            "rotation.epoch_every",
        ),
        ("[deletion]\ngrace = \"300000years\"\n", "deletion.grace"),
        (
            "[[sources]]\ntype = \"command\"\nname = \"dump\"\ncommand = [\"true\"]\ntimeout = \"300000years\"\n",
            "sources[1].timeout",
        ),
    ] {
        policy_with(&cli, &data, extra);
        let v = cli.run(&["policy", "validate"]);
        assert_eq!(v.code, 1, "{field}: {}\n{}", v.stdout, v.stderr);
        let shown = format!("{}{}", v.stdout, v.stderr);
        assert!(
            shown.contains(&format!("{field}: invalid duration")),
            "{field}: {shown}"
        );
        let b = cli.run(&["backup", "acme", "--json"]);
        assert_eq!(b.code, 1, "{field}: {}\n{}", b.stdout, b.stderr);
        assert_eq!(b.json()["error"]["kind"], "invalid_policy", "{field}");
        assert!(!cli.store().join("tenants/acme").exists(), "{field}");
    }

    // custos.toml.
    policy_with(&cli, &data, "");
    let config = cli.path().join("custos.toml");
    let good = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        format!("{good}[daemon]\nshutdown_timeout = \"300000years\"\n"),
    )
    .unwrap();
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "invalid_config", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("daemon.shutdown_timeout"),
        "{e}"
    );
    fs::write(&config, good).unwrap();

    // Command-line flags: usage errors (exit 2) naming the flag, or a
    // refusal naming it; never a panic (exit 101).
    cli.ok(&["backup", "acme"]);
    for (args, code, name) in [
        (
            &["forget", "acme", "--keep-within", "300000years"][..],
            2,
            "--keep-within",
        ),
        (
            &[
                "drill",
                "acme",
                "--snapshot",
                "random",
                "--within",
                "300000years",
            ][..],
            2,
            "--within",
        ),
        (
            &["audit", "show", "--since", "300000years"][..],
            1,
            "--since",
        ),
    ] {
        let r = cli.run(args);
        assert_eq!(r.code, code, "{args:?}: {}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(name) && r.stderr.contains("longer than 1000 years"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

/// Makes every directory under `root` immutable (`chattr +i`: even root
/// cannot create or remove entries, EPERM) until dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn new(root: &Path) -> Option<Immutable> {
        let mut dirs = vec![root.to_owned()];
        let mut i = 0;
        while i < dirs.len() {
            for e in fs::read_dir(&dirs[i]).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                }
            }
            i += 1;
        }
        let guard = Immutable(Vec::new());
        let mut guard = guard;
        for d in dirs {
            let ok = Command::new("chattr")
                .arg("+i")
                .arg(&d)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("skipped: chattr +i {} is not supported here", d.display());
                return None;
            }
            guard.0.push(d);
        }
        Some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(d).status();
        }
    }
}

/// The store refuses writes for `why`; every job that must write says so
/// (`want_kind`, the OS reason in the message), never "lease held by another
/// process", and the store is unchanged.
fn assert_store_error(cli: &Cli, want_kind: &str, os_reason: &str) {
    for args in [
        &["backup", "acme", "--json"][..],
        &["forget", "acme", "--keep-last", "1", "--json"][..],
        &["rotate", "acme", "--new-epoch", "--json"][..],
    ] {
        let r = cli.run(args);
        assert_eq!(r.code, 1, "{args:?}: {}\n{}", r.stdout, r.stderr);
        let e = r.json()["error"].clone();
        assert_eq!(e["kind"], want_kind, "{args:?}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(os_reason), "{args:?}: {e}");
        assert!(!message.contains("lease held"), "{args:?}: {e}");
    }
}

/// Issue 12, case 11: a read-only store was reported as `lease_contended:
/// lease held by another process … until unknown`: the local store's EROFS
/// was retried as a transient error until the lease gave up.
#[test]
fn a_read_only_store_is_a_store_error_naming_erofs() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let store = cli.store();
    let Some(_bind) = Mount::new(&["--bind", store.to_str().unwrap()], &store) else {
        return;
    };
    let Some(_ro) = Mount::new(&["-o", "remount,bind,ro"], &store) else {
        return;
    };
    let before = cli.objects("acme");
    assert_store_error(&cli, "store_error", "Read-only file system (os error 30)");
    // Without the cached conditional-write probe, the probe says the same
    // (it was `invalid_store` / `conditional_writes_unsupported` before).
    fs::remove_dir_all(cli.path().join("state/probes")).unwrap();
    assert_store_error(&cli, "store_error", "Read-only file system (os error 30)");
    assert_eq!(before, cli.objects("acme"));
}

/// The next thing to try: a store whose directories are immutable (EPERM,
/// even for root) and one on a full file system (ENOSPC).
#[test]
fn an_immutable_or_full_store_says_so() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    if let Some(_frozen) = Immutable::new(&cli.store()) {
        assert_store_error(&cli, "store_error", "Operation not permitted (os error 1)");
    }
    cli.ok(&["backup", "acme"]);
    cli.ok(&["check", "acme", "--read-data"]);

    // A store on a file system too small for the data.
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let mut b = vec![0u8; 3 << 20];
    custos::util::fill_random(&mut b);
    fs::write(data.join("random.bin"), b).unwrap();
    cli.policy("acme", &data);
    let store = cli.store();
    fs::create_dir_all(&store).unwrap();
    let Some(_mount) = Mount::new(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &store) else {
        return;
    };
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "insufficient_space", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device (os error 28)"),
        "{e}"
    );
    assert!(cli.object_paths("acme", "snapshots").is_empty());
}

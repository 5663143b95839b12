//! Bad input gets a clear error naming the problem, a non-zero exit, and
//! stores nothing.

use crate::common;

use std::fs;

use crate::common::Cli;

fn store_is_empty(cli: &Cli) -> bool {
    !cli.store().join("tenants").exists()
        || fs::read_dir(cli.store().join("tenants"))
            .unwrap()
            .next()
            .is_none()
}

#[test]
fn invalid_tenant_ids_are_refused() {
    let cli = Cli::new();
    for bad in ["../x", "Acme", "a/b", "ünï", "-a", &"a".repeat(64)] {
        for cmd in [
            vec!["backup", "--", bad],
            vec!["tenant", "init", "--", bad],
            vec!["snapshots", "--", bad],
        ] {
            let r = cli.run(&cmd);
            assert_eq!(r.code, 1, "{cmd:?}");
            assert!(
                r.stderr.contains("invalid tenant id"),
                "{cmd:?}: {}",
                r.stderr
            );
        }
    }
    let r = cli.run(&["backup", "Acme", "--json"]);
    assert_eq!(r.json()["error"]["kind"], "invalid_tenant_id");
    assert!(store_is_empty(&cli));
}

#[test]
fn a_malformed_policy_names_file_and_line() {
    let cli = Cli::new();
    fs::write(cli.path().join("policies/acme.toml"), "tenant = \"acme\"\nkey = \"local:acme\"\n[backup]\nschedule = \"not a cron\"\n[[sources]]\ntype = \"path\"\npath = \"/tmp\"\nbogus = 1\n").unwrap();
    let r = cli.run(&["backup", "acme"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("acme.toml:4"),
        "cron error with its line: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("bogus"),
        "unknown key named: {}",
        r.stderr
    );
    let v = cli.run(&[
        "policy",
        "validate",
        cli.path().join("policies").to_str().unwrap(),
    ]);
    assert_eq!(v.code, 1);
    assert!(
        v.stdout.contains("acme.toml:4") && v.stdout.contains("acme.toml:8"),
        "{}",
        v.stdout
    );
    assert!(store_is_empty(&cli));
}

#[test]
fn an_unknown_key_reference_is_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(cli.path().join("policies/acme.toml"), format!("tenant = \"acme\"\nkey = \"vault:acme\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\n", data.display())).unwrap();
    let r = cli.run(&["backup", "acme"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("unknown key provider \"vault\""),
        "{}",
        r.stderr
    );
    let r = cli.run(&["tenant", "init", "beta", "--key", "nope:x"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown key provider"), "{}", r.stderr);
    // An AWS KMS key without any AWS configuration: a clear error, nothing stored.
    let r = cli.run(&[
        "tenant",
        "init",
        "gamma",
        "--key",
        "aws-kms:alias/custos-gamma",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("region"), "{}", r.stderr);
    assert!(store_is_empty(&cli));
}

#[test]
fn a_missing_source_directory_fails_before_anything_is_stored() {
    let cli = Cli::new();
    cli.policy("acme", &cli.path().join("does-not-exist"));
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(r.code, 1);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "source_error");
    assert!(
        e["message"].as_str().unwrap().contains("does not exist"),
        "{e}"
    );
    assert!(store_is_empty(&cli), "no descriptor or key was created");
    assert!(!cli.path().join("keys/acme.key").exists());
}

#[test]
fn a_failing_command_source_leaves_no_snapshot() {
    let cli = Cli::new();
    fs::write(cli.path().join("policies/acme.toml"), "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"command\"\nname = \"db.dump\"\ncommand = [\"sh\", \"-c\", \"echo partial dump; echo 'pg_dump: connection refused' >&2; exit 2\"]\n").unwrap();
    let r = cli.run(&["backup", "acme"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("connection refused") && r.stderr.contains("exit status: 2"),
        "{}",
        r.stderr
    );
    assert!(cli.object_paths("acme", "snapshots").is_empty());
    // A good run afterwards works, and prune removes what the failed run uploaded.
    fs::write(cli.path().join("policies/acme.toml"), "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"command\"\nname = \"db.dump\"\ncommand = [\"sh\", \"-c\", \"echo full dump\"]\n").unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["prune", "acme"]);
    cli.ok(&["check", "acme", "--read-data"]);
    let target = cli.path().join("r");
    cli.ok(&[
        "restore",
        "acme",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::read_to_string(target.join("db.dump")).unwrap(),
        "full dump\n"
    );
}

#[test]
fn restore_targets_are_checked() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 3);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    // Not empty.
    let busy = cli.path().join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("keep.txt"), "mine").unwrap();
    let r = cli.run(&[
        "restore",
        "acme",
        "latest",
        "--target",
        busy.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("not empty") && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read_to_string(busy.join("keep.txt")).unwrap(), "mine");
    // A symlink to elsewhere.
    let link = cli.path().join("link");
    std::os::unix::fs::symlink(&busy, &link).unwrap();
    let r = cli.run(&[
        "restore",
        "acme",
        "latest",
        "--target",
        link.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    // Unknown snapshot ids.
    let t = cli.path().join("t");
    for (snap, msg) in [
        ("deadbeef", "not found"),
        ("xyz", "expected"),
        ("ab", "at least 4"),
    ] {
        let r = cli.run(&["restore", "acme", snap, "--target", t.to_str().unwrap()]);
        assert_eq!(r.code, 1, "{snap}");
        assert!(r.stderr.contains(msg), "{snap}: {}", r.stderr);
    }
    // --overwrite restores over existing files and keeps unrelated ones.
    cli.ok(&[
        "restore",
        "acme",
        "latest",
        "--target",
        busy.to_str().unwrap(),
        "--overwrite",
    ]);
    common::assert_same(&data, &busy.join("data"));
    assert_eq!(fs::read_to_string(busy.join("keep.txt")).unwrap(), "mine");
}

#[test]
fn unknown_commands_and_flags_are_usage_errors() {
    let cli = Cli::new();
    assert_eq!(cli.run(&["frobnicate"]).code, 2);
    assert_eq!(cli.run(&["backup"]).code, 2);
    assert_eq!(
        cli.run(&["check", "acme", "--read-data", "--read-data-subset", "1/2"])
            .code,
        2
    );
    let r = cli.run(&["check", "acme", "--read-data-subset", "3/2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("N/M"), "{}", r.stderr);
}

/// `custos … | head -1`: stdout closed before custos writes its result. It
/// once panicked ("failed printing to stdout: Broken pipe", exit 101).
#[test]
fn a_closed_stdout_is_no_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    for _ in 0..5 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["policy", "validate", policies])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before custos prints (it starts in milliseconds).
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            matches!(status.code(), Some(0 | 141)),
            "{status:?}: {stderr}"
        );
    }
}

#[test]
fn completions_cover_every_shell_and_the_subcommands() {
    let cli = Cli::new();
    for shell in ["bash", "zsh", "fish"] {
        let r = cli.run(&["completions", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(!r.stdout.trim().is_empty(), "{shell}: empty script");
        for sub in ["backup", "restore", "drill", "shred", "certificate"] {
            assert!(r.stdout.contains(sub), "{shell}: no {sub}");
        }
        if shell == "bash" {
            let script = cli.path().join("custos.bash");
            fs::write(&script, &r.stdout).unwrap();
            let check = std::process::Command::new("bash")
                .arg("-n")
                .arg(&script)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    let r = cli.run(&["completions", "powershell-or-so"]);
    assert_eq!(r.code, 2, "an unknown shell is invalid usage");
}

#[test]
fn man_pages_for_every_subcommand() {
    let cli = Cli::new();
    let out = cli.path().join("man");
    let r = cli.run(&["man", "--out", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut expected = vec!["custos.1".to_owned()];
    for sub in [
        "tenant",
        "tenant-init",
        "backup",
        "snapshots",
        "restore",
        "check",
        "forget",
        "prune",
        "policy",
        "drill",
        "audit",
        "audit-verify",
        "rotate",
        "store",
        "daemon",
        "shred",
        "certificate",
        "certificate-verify",
        "unlock",
        "completions",
    ] {
        expected.push(format!("custos-{sub}.1"));
    }
    for name in &expected {
        let page = fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        // clap_mangen's preamble defines the apostrophe string first.
        let first = page
            .lines()
            .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
            .unwrap_or("");
        assert!(first.starts_with(".TH "), "{name}: {first}");
    }
    // The hidden `man` command has no page; nothing but pages is written.
    for entry in fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(name.starts_with("custos") && name.ends_with(".1"), "{name}");
        assert_ne!(name, "custos-man.1");
        assert_ne!(name, "custos-help.1");
    }
    // Rendered without warnings where groff is installed.
    let groff = std::process::Command::new("groff")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if groff {
        for name in &expected {
            let render = std::process::Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(out.join(name))
                .output()
                .unwrap();
            assert!(
                render.status.success() && render.stderr.is_empty(),
                "{name}: {}",
                String::from_utf8_lossy(&render.stderr)
            );
        }
    }
}

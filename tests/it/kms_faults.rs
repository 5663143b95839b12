//! KMS faults: the key provider unreachable, throttling, and the CMK
//! disabled in the middle of a backup. Every job fails with a clear error
//! and its exact kind, stores nothing unencrypted and writes no plaintext
//! key anywhere.
//!
//! Semantics of "disabled mid-backup" (docs/reliability.md): the data key
//! is unwrapped once, at the start of the job, so the running backup goes on
//! encrypting; before it commits its snapshot it asks the provider again,
//! and a key that is no longer enabled stops the commit (`key_unavailable`).
//! The packs it uploaded stay unreferenced until the next prune. Every later
//! job fails at unwrap until the key is enabled again.
//!
//! The local provider's faults are injected with `CUSTOS_KEY_FAULTS`
//! (src/keys/faults.rs); the AWS cases use a closed port as the endpoint and
//! a key disabled on LocalStack (gated on CUSTOS_TEST_EMULATORS=1).
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::common::Cli;

/// Random, incompressible content whose bytes must never appear in the store
/// or the state directory (it would mean data stored unencrypted).
fn marker_file(dir: &Path) -> Vec<u8> {
    let mut m = vec![0u8; 64 << 10];
    custos::util::fill_random(&mut m);
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("secret.bin"), &m).unwrap();
    m
}

fn assert_no_plaintext(cli: &Cli, marker: &[u8]) {
    for root in [cli.store(), cli.path().join("state")] {
        for f in common::files_under(&root) {
            let bytes = fs::read(&f).unwrap();
            for window in marker.chunks(4096) {
                assert!(
                    !bytes.windows(32).any(|w| w == &window[..32]),
                    "plaintext of the source found in {}",
                    f.display()
                );
            }
        }
    }
}

fn objects(cli: &Cli) -> BTreeMap<String, Vec<u8>> {
    cli.objects("acme")
}

#[test]
fn kms_unreachable_or_throttling_fails_cleanly_and_stores_nothing() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    let marker = marker_file(&data);
    cli.policy("acme", &data);
    // First contact: the tenant cannot even be initialised; no key, no object.
    let r = cli.run_env(
        &["backup", "acme", "--json"],
        &[("CUSTOS_KEY_FAULTS", "unreachable")],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "kms_unreachable", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("unreachable"),
        "{e}"
    );
    assert!(objects(&cli).is_empty(), "nothing stored");
    assert!(!cli.path().join("keys/acme.key").exists(), "no key created");
    // An initialised tenant: each job fails with the provider's error kind.
    cli.ok(&["backup", "acme"]);
    fs::write(data.join("more"), "more").unwrap();
    let before = objects(&cli);
    let target = cli.path().join("r");
    for (fault, kind) in [
        ("unreachable", "kms_unreachable"),
        ("throttled", "kms_throttled"),
    ] {
        for args in [
            vec!["backup", "acme", "--json"],
            vec!["check", "acme", "--read-data", "--json"],
            vec![
                "restore",
                "acme",
                "latest",
                "--target",
                target.to_str().unwrap(),
                "--json",
            ],
            vec!["prune", "acme", "--json"],
        ] {
            let r = cli.run_env(&args, &[("CUSTOS_KEY_FAULTS", fault)]);
            assert_eq!(r.code, 1, "{args:?} {fault}: {}\n{}", r.stdout, r.stderr);
            assert_eq!(r.json()["error"]["kind"], kind, "{args:?}: {}", r.stdout);
        }
        assert_eq!(before, objects(&cli), "{fault}: store unchanged");
        assert!(!target.exists(), "nothing restored");
    }
    assert_no_plaintext(&cli, &marker);
    cli.ok(&["check", "acme", "--read-data"]);
}

#[test]
fn a_key_disabled_mid_backup_stops_the_commit() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    let marker = marker_file(&data);
    let key_file = cli.path().join("keys/acme.key");
    let policy = |disable: bool| {
        let cmd = if disable {
            // Sources run in name order: "data" first, then this one, which
            // disables the CMK (as its owner would, in the KMS) and goes on.
            format!(
                "sed -i 's/\\\"state\\\": \\\"enabled\\\"/\\\"state\\\": \\\"disabled\\\"/' {}; echo dump",
                key_file.display()
            )
        } else {
            "echo dump".to_owned()
        };
        fs::write(
            cli.path().join("policies/acme.toml"),
            format!(
                "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[[sources]]\ntype = \"command\"\nname = \"zz-dump\"\ncommand = [\"sh\", \"-c\", {cmd:?}]\n",
                data.display()
            ),
        )
        .unwrap();
    };
    policy(false);
    cli.ok(&["backup", "acme"]);
    let snapshots = cli.object_paths("acme", "snapshots");
    let mut big = vec![0u8; 6 << 20];
    custos::util::fill_random(&mut big);
    fs::write(data.join("new.bin"), &big).unwrap();
    policy(true);
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "key_unavailable", "{e}");
    assert_eq!(e["message"], "key local:acme is disabled", "{e}");
    assert!(
        fs::read_to_string(&key_file)
            .unwrap()
            .contains("\"disabled\""),
        "the command disabled the key"
    );
    assert_eq!(
        snapshots,
        cli.object_paths("acme", "snapshots"),
        "no snapshot committed"
    );
    // Every later job fails at unwrap, with the same kind.
    policy(false);
    for args in [
        vec!["backup", "acme", "--json"],
        vec!["check", "acme", "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}");
        assert_eq!(r.json()["error"]["kind"], "key_unavailable", "{}", r.stdout);
    }
    assert_no_plaintext(&cli, &marker);
    // Enabled again: back to normal, and prune removes the stopped run's packs.
    let text = fs::read_to_string(&key_file)
        .unwrap()
        .replace("\"state\": \"disabled\"", "\"state\": \"enabled\"");
    fs::write(&key_file, text).unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["prune", "acme"]);
    let r = cli.ok(&["check", "acme", "--read-data", "--json"]);
    assert_eq!(r.json()["result"]["unreferenced_packs"], 0);
}

fn emulators() -> bool {
    common::require(
        std::env::var("CUSTOS_TEST_EMULATORS").is_ok_and(|v| v == "1"),
        "the KMS emulator",
    )
}

/// AWS KMS at an endpoint nothing listens on: a clear `kms_unreachable`,
/// nothing stored.
#[test]
fn aws_kms_unreachable() {
    if !emulators() {
        return;
    }
    let cli = Cli::new();
    let data = cli.path().join("data");
    marker_file(&data);
    fs::write(
        cli.path().join("policies/acme.toml"),
        format!(
            "tenant = \"acme\"\nkey = \"aws-kms:alias/custos-test-a\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let mut envs = common::aws_env();
    envs.retain(|(k, _)| !k.starts_with("AWS_ENDPOINT_URL"));
    envs.push(("AWS_ENDPOINT_URL_KMS".into(), "http://127.0.0.1:9".into()));
    envs.push(("AWS_MAX_ATTEMPTS".into(), "2".into()));
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = cli.run_env(&["backup", "acme", "--json"], &envs);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "kms_unreachable", "{e}");
    assert!(objects(&cli).is_empty(), "nothing stored");
}

/// A KMS key disabled after the tenant's first backup (LocalStack enforces
/// key states; moto does not, and the case is skipped there).
#[test]
fn aws_kms_key_disabled() {
    if !emulators() {
        return;
    }
    if std::env::var("CUSTOS_EMULATOR").is_ok_and(|v| v == "moto") {
        eprintln!("SKIPPED (moto does not enforce KMS key states): aws_kms_key_disabled");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        aws_sdk_kms::Client::new(&conf)
    });
    let key_id = rt.block_on(async {
        client
            .create_key()
            .description("custos reliability test (disabled mid-life)")
            .send()
            .await
            .unwrap()
            .key_metadata
            .unwrap()
            .key_id
    });
    let cli = Cli::new();
    let data = cli.path().join("data");
    let marker = marker_file(&data);
    fs::write(
        cli.path().join("policies/acme.toml"),
        format!(
            "tenant = \"acme\"\nkey = \"aws-kms:{key_id}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let envs = common::aws_env();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = cli.run_env(&["backup", "acme"], &envs);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    rt.block_on(client.disable_key().key_id(&key_id).send())
        .unwrap();
    fs::write(data.join("more"), "more").unwrap();
    let before = objects(&cli);
    let r = cli.run_env(&["backup", "acme", "--json"], &envs);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "key_unavailable", "{e}");
    assert!(e["message"].as_str().unwrap().contains("disabled"), "{e}");
    assert_eq!(before, objects(&cli), "store unchanged");
    assert_no_plaintext(&cli, &marker);
    rt.block_on(
        client
            .schedule_key_deletion()
            .key_id(&key_id)
            .pending_window_in_days(7)
            .send(),
    )
    .ok();
}

/// A job that reads many snapshots of one epoch asks a failing provider
/// once, not once a snapshot: with a thousand snapshots and a KMS that
/// times out, asking each time would take the job's retries a thousand
/// times over. `tenant show` also asks for the key's state once, and says
/// its snapshots are unreadable rather than that there are none.
#[test]
fn a_failing_key_is_asked_once_a_job() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    cli.policy("acme", &data);
    for i in 0..4 {
        fs::write(data.join("f"), format!("version {i}")).unwrap();
        cli.ok(&["backup", "acme"]);
    }
    let target = cli.path().join("r");
    let asked = |stderr: &str, operation: &str| {
        stderr
            .matches(&format!("injected key provider fault on {operation}"))
            .count()
    };
    for args in [
        vec!["snapshots", "acme"],
        vec![
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
        vec!["drill", "acme"],
    ] {
        let r = cli.run_env(&args, &[("CUSTOS_KEY_FAULTS", "unreachable")]);
        assert_eq!(r.code, 1, "{args:?}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(asked(&r.stderr, "unwrap"), 1, "{args:?}:\n{}", r.stderr);
    }
    let r = cli.run_env(
        &["tenant", "show", "acme", "--json"],
        &[("CUSTOS_KEY_FAULTS", "unreachable")],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(asked(&r.stderr, "unwrap"), 1, "{}", r.stderr);
    assert_eq!(asked(&r.stderr, "describe"), 1, "{}", r.stderr);
    let shown = r.json()["result"].clone();
    assert_eq!(shown["snapshots"], 4, "{shown}");
    assert!(shown["latest_snapshot"].is_null(), "{shown}");
    let why = shown["snapshots_error"].as_str().unwrap_or_default();
    assert!(why.contains("unreachable"), "{shown}");
    assert!(
        shown["key_error"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{shown}"
    );
    // Without the fault, all four and no error.
    let shown = cli.ok(&["tenant", "show", "acme", "--json"]).json()["result"].clone();
    assert_eq!(shown["snapshots"], 4, "{shown}");
    assert!(shown["snapshots_error"].is_null(), "{shown}");
    assert!(shown["key_error"].is_null(), "{shown}");
}

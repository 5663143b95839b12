//! The PKCS#11 provider through the real binary and `custos.toml`'s
//! `[pkcs11]`: tenant init (`--create-key` creates the key object; without
//! it the key must exist), backup, restore,
//! check, rotate --cmk and --replace-cmk, forget, shred and the certificate,
//! offline and --online; a wrong PIN and a missing `[pkcs11]` are clear
//! errors. Each custos run is its own process, so its login to the token is
//! its own (PKCS#11 shares one login between all sessions of a process).
//!
//! Runs on the token `scripts/softhsm.sh start` makes (or the one the
//! `CUSTOS_TEST_PKCS11_*` variables name); skipped without one, a failure
//! under `CUSTOS_TEST_EMULATORS=1`.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::common::{self, Cli};
use custos::keys::KeyProvider;
use custos::keys::pkcs11::{PinSource, Pkcs11Provider};

fn write_config(cli: &Cli, module: &std::path::Path, pin_file: &std::path::Path) {
    let d = cli.path();
    fs::write(
        d.join("custos.toml"),
        format!(
            "store = \"file://{0}/store\"\nstate_dir = \"{0}/state\"\npolicies_dir = \"{0}/policies\"\n\
             [local_keys]\ndir = \"{0}/keys\"\n[pkcs11]\nmodule = \"{1}\"\npin_file = \"{2}\"\ntimeout = \"20s\"\n",
            d.display(),
            module.display(),
            pin_file.display()
        ),
    )
    .unwrap();
}

fn write_policy(cli: &Cli, key: &str, data: &std::path::Path) {
    fs::write(
        cli.path().join("policies/acme.toml"),
        format!(
            "tenant = \"acme\"\nkey = \"{key}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[retention]\nkeep_last = 2\n",
            data.display()
        ),
    )
    .unwrap();
}

#[track_caller]
fn ok_json(cli: &Cli, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let r = cli.run(&all);
    assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
    r.json()["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_through_the_cli() {
    let Some((settings, token)) = common::pkcs11_settings() else {
        return;
    };
    let _alone = common::pkcs11_alone();
    let PinSource::File(pin_file) = settings.pin.clone() else {
        unreachable!()
    };
    let pin = fs::read_to_string(&pin_file).unwrap().trim().to_owned();
    let key_a = common::pkcs11_key(&token, "cli-a");
    let key_b = common::pkcs11_key(&token, "cli-b");
    // This process only looks (describe) and makes the replacement key.
    let provider = Pkcs11Provider::open(&settings).unwrap();
    provider.create_key(&key_b).await.unwrap();

    let cli = Cli::new();
    write_config(&cli, &settings.module, &pin_file);
    let data = cli.path().join("data");
    common::make_tree(&data, 10);
    write_policy(&cli, &key_a.to_string(), &data);

    let (cli, key_a, key_b) = tokio::task::spawn_blocking(move || {
        // Without --create-key the key must exist on the token.
        let r = cli.run(&[
            "tenant",
            "init",
            "acme",
            "--key",
            &key_a.to_string(),
            "--json",
        ]);
        assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
        let v = r.json();
        assert_eq!(v["error"]["kind"], "key_unavailable", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--create-key"),
            "{v}"
        );
        // With it, tenant init creates the object on the token.
        let r = ok_json(
            &cli,
            &[
                "tenant",
                "init",
                "acme",
                "--key",
                &key_a.to_string(),
                "--create-key",
            ],
        );
        eprintln!("[pkcs11] tenant init: {r}");
        ok_json(&cli, &["backup", "acme"]);
        let target = cli.path().join("r1");
        ok_json(
            &cli,
            &[
                "restore",
                "acme",
                "latest",
                "--target",
                target.to_str().unwrap(),
            ],
        );
        common::assert_same(&data, &target.join("data"));
        ok_json(&cli, &["check", "acme", "--read-data"]);
        let r = ok_json(&cli, &["rotate", "acme", "--cmk"]);
        assert_eq!(r["envelopes_rewrapped"], 1, "{r}");
        assert_eq!(
            (
                r["key_version_before"].as_str(),
                r["key_version_after"].as_str()
            ),
            (Some("1"), Some("2")),
            "{r}"
        );
        fs::write(data.join("later.txt"), "a second snapshot").unwrap();
        ok_json(&cli, &["backup", "acme"]);
        let r = ok_json(
            &cli,
            &["rotate", "acme", "--replace-cmk", &key_b.to_string()],
        );
        assert_eq!(r["envelopes_rewrapped"], 1, "{r}");
        write_policy(&cli, &key_b.to_string(), &data);
        ok_json(&cli, &["forget", "acme", "--keep-last", "1", "--prune"]);
        ok_json(&cli, &["check", "acme", "--read-data"]);

        // A wrong PIN: key_unavailable, and the PIN shows nowhere.
        let wrong = cli.path().join("wrong.pin");
        fs::write(&wrong, "0000000000000000\n").unwrap();
        fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
        write_config(&cli, &settings.module, &wrong);
        let r = cli.run(&["check", "acme", "--read-data", "--json"]);
        assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
        let v = r.json();
        eprintln!("[pkcs11] wrong PIN: {v}");
        assert_eq!(v["error"]["kind"], "key_unavailable", "{v}");
        for shown in [&r.stdout, &r.stderr] {
            assert!(
                !shown.contains("0000000000000000") && !shown.contains(&pin),
                "PIN in {shown}"
            );
        }
        write_config(&cli, &settings.module, &pin_file);
        (cli, key_a, key_b)
    })
    .await
    .unwrap();

    let cli = tokio::task::spawn_blocking(move || {
        let out = cli.path().join("cert.json");
        let r = ok_json(
            &cli,
            &[
                "shred",
                "acme",
                "--confirm",
                "acme",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        eprintln!("[pkcs11] shred: {r}");
        assert_eq!(r["guarantee"], "keys_destroyed", "{r}");
        let v = ok_json(&cli, &["certificate", "verify", out.to_str().unwrap()]);
        assert_eq!(v["valid"], true, "{v}");
        let v = ok_json(
            &cli,
            &["certificate", "verify", out.to_str().unwrap(), "--online"],
        );
        assert_eq!(v["online"]["ok"], true, "{v}");
        for k in v["online"]["keys"].as_array().unwrap() {
            assert_eq!(k["state"]["state"], "destroyed", "{v}");
        }
        cli
    })
    .await
    .unwrap();
    // Both keys are gone from the token: a search finds neither.
    for key in [&key_a, &key_b] {
        let info = provider.describe(key).await.unwrap();
        assert!(
            matches!(info.state, custos::keys::KeyState::Destroyed { .. }),
            "{key}: {info:?}"
        );
        assert!(info.current_version.is_none(), "{info:?}");
    }
    drop(cli);
}

/// Without `[pkcs11]`, a PKCS#11 key is refused with what to add.
#[test]
fn missing_pkcs11_section_is_a_clear_error() {
    let cli = Cli::new();
    let r = cli.run(&[
        "tenant",
        "init",
        "acme",
        "--key",
        "pkcs11:token=custos;object=acme",
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["error"]["kind"], "key_provider_unsupported", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("[pkcs11]"),
        "{v}"
    );
}

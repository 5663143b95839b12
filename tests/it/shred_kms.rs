//! Crypto-shredding under AWS KMS, on LocalStack (or real AWS KMS): a tenant
//! under a KMS-generated key (DisableKey + ScheduleKeyDeletion) and one under
//! imported key material (DeleteImportedKeyMaterial), and an epoch shred that
//! re-wraps to a customer-created key. Afterwards KMS must refuse to decrypt
//! the tenant's envelopes, and the certificate must verify offline with only
//! the audit public key, and fail on any edited byte.
//!
//! Gated like tests/it/key_providers.rs: runs (and must pass) when
//! `CUSTOS_TEST_EMULATORS=1`, prints `skipped:` otherwise. On moto
//! (`CUSTOS_EMULATOR=moto`) KMS key states are not enforced, so a shred cannot
//! be verified there: the tests say so and assert nothing.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common::{self, env};

use std::fs;
use std::process::Command;

use crate::common::Cli;
use chrono::Utc;
use custos::format::envelope::Envelope;
use custos::jobs::shred::certificate;
use custos::keys::aws_kms::{AwsKmsProvider, AwsKmsSettings};
use custos::keys::{KeyError, KeyProvider, KeyRef, KeyState};
use serde_json::Value;

fn endpoint() -> String {
    env("AWS_ENDPOINT_URL_KMS")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|| "http://127.0.0.1:4566".into())
}

/// The KMS to test against, or `None` (with the reason printed) to skip.
async fn kms() -> Option<AwsKmsProvider> {
    if env("CUSTOS_TEST_EMULATORS").as_deref() != Some("1") {
        eprintln!("skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)");
        return None;
    }
    if env("CUSTOS_EMULATOR").as_deref() == Some("moto") {
        eprintln!(
            "SKIPPED (moto does not enforce KMS key states: a disabled or pending-deletion key still decrypts, so a shred cannot be verified)"
        );
        return None;
    }
    let settings = AwsKmsSettings {
        region: Some(env("AWS_REGION").unwrap_or_else(|| "us-east-1".into())),
        endpoint_url: Some(endpoint()),
        access_key_id: Some(env("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "test".into())),
        secret_access_key: Some(env("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "test".into())),
        profile: None,
    };
    Some(
        AwsKmsProvider::new(&settings)
            .await
            .expect("AWS KMS provider from the test environment"),
    )
}

/// An installation whose custos.toml reaches the KMS; the store is local.
fn installation() -> Cli {
    let cli = Cli::new();
    let toml = cli.path().join("custos.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "[aws]\nregion = \"{}\"\nendpoint_url = \"{}\"\nallow_http = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        env("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
        endpoint(),
        env("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "test".into()),
        env("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "test".into()),
    ));
    fs::write(&toml, text).unwrap();
    cli
}

fn policy(cli: &Cli, tenant: &str, key: &KeyRef) {
    let src = cli.path().join("src").join(tenant);
    fs::create_dir_all(&src).unwrap();
    fs::write(
        src.join("hello.txt"),
        format!("hello {tenant}\n").repeat(300),
    )
    .unwrap();
    let mut rnd = vec![0u8; 300 << 10];
    custos::util::fill_random(&mut rnd);
    fs::write(src.join("random.bin"), &rnd).unwrap();
    fs::write(
        cli.path().join(format!("policies/{tenant}.toml")),
        format!(
            "tenant = \"{tenant}\"\nkey = \"{key}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[retention]\nkeep_last = 2\n",
            src.display()
        ),
    )
    .unwrap();
}

fn run(cli: &Cli, args: &[&str]) -> common::Run {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(cli.path().join("custos.toml"))
        .args(args)
        .env("CUSTOS_LOG", "info")
        .env("CUSTOS_LOG_FORMAT", "json")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("CUSTOS_CRASH_AT")
        .output()
        .expect("run custos");
    common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(cli: &Cli, args: &[&str]) -> common::Run {
    let r = run(cli, args);
    assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
    r
}

fn envelope(cli: &Cli, tenant: &str, epoch: u32) -> Envelope {
    Envelope::parse(&fs::read(cli.store().join(format!("tenants/{tenant}/keys/{epoch}"))).unwrap())
        .unwrap()
}

/// Shreds a tenant through the CLI; returns the certificate's bytes and result.
fn shred(cli: &Cli, tenant: &str) -> (Vec<u8>, Value) {
    let out = cli.path().join(format!("{tenant}.cert.json"));
    let r = ok(
        cli,
        &[
            "shred",
            tenant,
            "--confirm",
            tenant,
            "--reason",
            "offboarding",
            "--pending-window-days",
            "7",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    (fs::read(&out).unwrap(), r.json()["result"].clone())
}

fn assert_every_byte_matters(cert: &[u8], key: &str) {
    for i in 0..cert.len() {
        let mut bad = cert.to_vec();
        bad[i] ^= 0x01;
        assert!(
            certificate::verify(&bad, key).is_err(),
            "byte {i} ({:?}) flipped went unnoticed",
            cert[i] as char
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shredding_under_kms_makes_the_envelopes_undecryptable() {
    let Some(kms) = kms().await else { return };
    let cli = installation();
    let normal = kms.create_test_key(None).await.unwrap();
    let imported = kms.create_imported_key(None).await.unwrap();
    policy(&cli, "kms-normal", &normal);
    policy(&cli, "kms-imported", &imported);
    ok(&cli, &["backup", "kms-normal"]);
    ok(&cli, &["backup", "kms-imported"]);
    let key_pub = ok(&cli, &["audit", "public-key"]).stdout.trim().to_owned();
    fs::write(cli.path().join("audit.pub"), &key_pub).unwrap();

    // Both envelopes unwrap before the shred.
    let env_normal = envelope(&cli, "kms-normal", 1);
    let env_imported = envelope(&cli, "kms-imported", 1);
    for env in [&env_normal, &env_imported] {
        kms.unwrap(&env.key, &env.wrapped, &env.context())
            .await
            .expect("the envelope unwraps before the shred");
    }

    // A KMS-generated key: disabled, then scheduled for deletion in 7 days.
    let before = Utc::now();
    let (cert, res) = shred(&cli, "kms-normal");
    assert_eq!(res["guarantee"], "keys_destroyed");
    let k = &res["keys"][0];
    assert_eq!(k["action"], "deletion_scheduled", "{res}");
    assert_eq!(k["state_after"]["state"], "pending_deletion");
    let v = certificate::verify(&cert, &key_pub).unwrap();
    let irreversible = v.certificate.guarantee.irreversible_at.unwrap();
    let days = (irreversible - before).num_hours() as f64 / 24.0;
    assert!((6.9..=7.1).contains(&days), "deletion in {days} days");
    assert!(
        v.certificate
            .guarantee
            .pending
            .as_deref()
            .unwrap()
            .contains("CancelKeyDeletion")
    );
    let err = kms
        .unwrap(&env_normal.key, &env_normal.wrapped, &env_normal.context())
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::PendingDeletion { .. }), "{err}");
    assert!(matches!(
        kms.describe(&normal).await.unwrap().state,
        KeyState::PendingDeletion { .. }
    ));
    assert!(v.certificate.verification.passed);
    assert_eq!(v.certificate.verification.envelopes[0].outcome, "refused");

    // Imported material: deleted at once.
    let (cert2, res2) = shred(&cli, "kms-imported");
    assert_eq!(
        res2["keys"][0]["action"], "imported_material_deleted",
        "{res2}"
    );
    let v2 = certificate::verify(&cert2, &key_pub).unwrap();
    assert!(v2.certificate.guarantee.pending.is_none());
    let err = kms
        .unwrap(
            &env_imported.key,
            &env_imported.wrapped,
            &env_imported.context(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::PendingImport { .. }), "{err}");
    assert_eq!(
        kms.describe(&imported).await.unwrap().state,
        KeyState::PendingImport
    );

    // Offline with only the public key (the binary, too), online against KMS.
    for (tenant, c) in [("kms-normal", &cert), ("kms-imported", &cert2)] {
        let file = cli.path().join(format!("{tenant}.cert.json"));
        assert_eq!(&fs::read(&file).unwrap(), c);
        let r = ok(
            &cli,
            &[
                "certificate",
                "verify",
                file.to_str().unwrap(),
                "--public-key",
                cli.path().join("audit.pub").to_str().unwrap(),
                "--online",
                "--json",
            ],
        );
        let o = r.json();
        assert_eq!(o["ok"], true, "{o}");
        assert_eq!(o["result"]["valid"], true);
        assert_eq!(o["result"]["online"]["ok"], true, "{o}");
    }
    // Any edited byte makes verification fail.
    assert_every_byte_matters(&cert, &key_pub);
    assert_every_byte_matters(&cert2, &key_pub);

    // The fence: backups of both are refused, naming the shred.
    for t in ["kms-normal", "kms-imported"] {
        let r = run(&cli, &["backup", t]);
        assert_eq!(r.code, 1);
        assert!(
            r.stderr.contains(&format!("tenant {t} shredded on")),
            "{}",
            r.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_epoch_shred_rewraps_to_a_customer_key_and_destroys_the_old_one() {
    let Some(kms) = kms().await else { return };
    let cli = installation();
    let old = kms.create_test_key(None).await.unwrap();
    let new = kms.create_test_key(None).await.unwrap();
    policy(&cli, "kms-epoch", &old);
    ok(&cli, &["backup", "kms-epoch"]);
    ok(&cli, &["rotate", "kms-epoch", "--new-epoch"]);
    ok(&cli, &["backup", "kms-epoch"]);
    ok(&cli, &["forget", "kms-epoch", "--keep-last", "1"]);
    let key_pub = ok(&cli, &["audit", "public-key"]).stdout.trim().to_owned();
    let stale = envelope(&cli, "kms-epoch", 1);

    // custos cannot create a KMS key: --rewrap alone is refused.
    let r = run(
        &cli,
        &[
            "shred",
            "kms-epoch",
            "--epoch",
            "1",
            "--rewrap",
            "--confirm",
            "kms-epoch",
        ],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--rewrap-to"), "{}", r.stderr);

    let r = ok(
        &cli,
        &[
            "shred",
            "kms-epoch",
            "--epoch",
            "1",
            "--rewrap-to",
            &new.to_string(),
            "--pending-window-days",
            "7",
            "--confirm",
            "kms-epoch",
            "--json",
        ],
    );
    let res = r.json()["result"].clone();
    assert_eq!(res["guarantee"], "keys_destroyed", "{res}");
    let cert = fs::read(cli.store().join(res["certificate_path"].as_str().unwrap())).unwrap();
    let v = certificate::verify(&cert, &key_pub).unwrap();
    assert_eq!(v.certificate.rewrap.as_ref().unwrap().to, new);
    assert_eq!(v.certificate.keys[0].reference, old);
    // The stale envelope of epoch 1 (as a versioned bucket keeps it) no longer unwraps…
    let err = kms
        .unwrap(&stale.key, &stale.wrapped, &stale.context())
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::PendingDeletion { .. }), "{err}");
    // …while epoch 2 lives on under the new key.
    let moved = envelope(&cli, "kms-epoch", 2);
    assert_eq!(moved.key, new);
    kms.unwrap(&moved.key, &moved.wrapped, &moved.context())
        .await
        .unwrap();
    // The policy still names the old key: point it at the new one.
    let policy_file = cli.path().join("policies/kms-epoch.toml");
    let text = fs::read_to_string(&policy_file).unwrap();
    fs::write(
        &policy_file,
        text.replace(&old.to_string(), &new.to_string()),
    )
    .unwrap();
    let target = cli.path().join("restored");
    ok(
        &cli,
        &[
            "restore",
            "kms-epoch",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(target.join("data/hello.txt").exists());
    ok(&cli, &["backup", "kms-epoch"]);
}

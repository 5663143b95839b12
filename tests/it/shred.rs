//! Crypto-shredding with the local key provider: through the `custos` binary
//! (shred, certificate verify, the fence afterwards, crash injection at every
//! step, epoch shreds, a tenant's whole life searched for key bytes) and
//! through the library (objects the store refuses to delete, certificate
//! tampering byte by byte). The AWS KMS (LocalStack) counterparts are in
//! tests/it/shred_kms.rs.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/it/common.rs fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common;

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::Cli;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use chrono::Utc;
use custos::TenantId;
use custos::context::Context;
use custos::jobs::shred::{self, ShredRequest, ShredTarget, certificate};
use custos::keys::KeyRef;
use custos::repo::Repo;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers

/// Runs the binary with extra environment; logs as JSON lines on stderr.
fn run_env(cli: &Cli, args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let mut envs = vec![("CUSTOS_LOG", "info"), ("CUSTOS_LOG_FORMAT", "json")];
    envs.extend_from_slice(env);
    cli.run_env(args, &envs)
}

fn ok(cli: &Cli, args: &[&str]) -> common::Run {
    let r = run_env(cli, args, &[]);
    assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
    r
}

/// An installation with a short lease TTL and `tenant`'s policy over a small tree.
/// Re-runs the shred of `tenant` and asserts it is refused with a message
/// holding every one of `says`.
fn refused(cli: &Cli, tenant: &str, says: &[&str]) {
    let r = run_env(cli, &["shred", tenant, "--confirm", tenant], &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(says.iter().all(|s| r.stderr.contains(s)), "{}", r.stderr);
}

fn installation(tenants: &[&str]) -> Cli {
    let cli = Cli::new();
    cli.short_lease();
    for t in tenants {
        let src = cli.path().join("src").join(t);
        make_data(&src, t);
        cli.policy(t, &src);
    }
    cli
}

fn make_data(root: &Path, tag: &str) {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("hello.txt"), format!("hello {tag}\n").repeat(500)).unwrap();
    let mut rnd = vec![0u8; 700 << 10];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("random.bin"), &rnd).unwrap();
    for i in 0..5 {
        fs::write(root.join(format!("sub/f{i}")), format!("{tag} {i}\n")).unwrap();
    }
}

fn public_key(cli: &Cli) -> String {
    let r = ok(cli, &["audit", "public-key"]);
    let path = cli.path().join("audit.pub");
    fs::write(&path, &r.stdout).unwrap();
    r.stdout.trim().to_owned()
}

fn certificates(cli: &Cli, tenant: &str) -> Vec<PathBuf> {
    let dir = cli.store().join("certificates").join(tenant);
    let mut v: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn descriptor(cli: &Cli, tenant: &str) -> Value {
    cli.descriptor(tenant)
}

async fn context(cli: &Cli) -> Context {
    let cfg = custos::config::Config::discover(Some(&cli.path().join("custos.toml"))).unwrap();
    Context::from_config(&cfg).await.unwrap()
}

/// Rolls the tenant to a new key epoch (`custos rotate --new-epoch`); returns it.
fn roll_epoch(cli: &Cli, tenant: &str) -> u64 {
    ok(cli, &["rotate", tenant, "--new-epoch"]);
    descriptor(cli, tenant)["current_epoch"].as_u64().unwrap()
}

/// Points the tenant's policy at `key` (after a re-wrap moved the tenant).
fn set_policy_key(cli: &Cli, tenant: &str, key: &str) {
    let path = cli.path().join(format!("policies/{tenant}.toml"));
    let text = fs::read_to_string(&path).unwrap();
    let old = format!("key = \"local:{tenant}\"");
    assert!(text.contains(&old));
    fs::write(&path, text.replace(&old, &format!("key = \"{key}\""))).unwrap();
}

fn verify_file(cli: &Cli, file: &Path) -> common::Run {
    run_env(
        cli,
        &[
            "certificate",
            "verify",
            file.to_str().unwrap(),
            "--public-key",
            cli.path().join("audit.pub").to_str().unwrap(),
        ],
        &[],
    )
}

// ---------------------------------------------------------------------------
// Tenant shred through the CLI

#[test]
fn shred_a_tenant_then_everything_is_refused() {
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    let snapshot =
        ok(&cli, &["snapshots", "acme", "--json"]).json()["result"]["snapshots"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let key_pub = public_key(&cli);

    // --confirm must repeat the tenant: a usage error otherwise, nothing done.
    let r = run_env(&cli, &["shred", "acme", "--confirm", "acne"], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--confirm"), "{}", r.stderr);
    assert_eq!(descriptor(&cli, "acme")["state"], "active");

    // A dry run says what the shred would do, and does none of it.
    let store_before = common::tree_contents(&cli.store());
    let plan = ok(&cli, &["shred", "acme", "--dry-run", "--json"]).json()["result"].clone();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["state"], "start");
    assert_eq!(
        plan["keys"],
        serde_json::json!([{"key": "local:acme", "role": "current", "action": "destroy"}])
    );
    let human = ok(&cli, &["shred", "acme", "--dry-run"]).stdout;
    assert!(
        human.contains("key local:acme (Current): destroyed"),
        "{human}"
    );
    assert_eq!(common::tree_contents(&cli.store()), store_before);
    assert_eq!(descriptor(&cli, "acme")["state"], "active");
    assert!(cli.path().join("keys/acme.key").exists());

    let out = cli.path().join("cert.json");
    let r = ok(
        &cli,
        &[
            "shred",
            "acme",
            "--confirm",
            "acme",
            "--reason",
            "contract ended",
            "--requested-by",
            "dpo@acme.example",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    let res = r.json()["result"].clone();
    assert_eq!(res["guarantee"], "keys_destroyed");
    assert_eq!(res["already_done"], false);
    assert_eq!(res["objects_retained"], 0);
    assert!(res["objects_deleted"].as_u64().unwrap() >= 4, "{res}");
    assert_eq!(
        res["objects_deleted"], plan["objects"],
        "the plan's scope is the shred's"
    );
    let certificate_id = res["certificate_id"].clone();
    let after = ok(&cli, &["shred", "acme", "--dry-run", "--json"]).json()["result"].clone();
    assert_eq!(after["state"], "done");
    assert_eq!(after["certificate_id"], certificate_id);
    let stored = certificates(&cli, "acme");
    assert_eq!(stored.len(), 1);
    assert_eq!(fs::read(&stored[0]).unwrap(), fs::read(&out).unwrap());

    // Offline verification with nothing but the public key.
    let verified = certificate::verify(&fs::read(&out).unwrap(), &key_pub).unwrap();
    let c = &verified.certificate;
    assert_eq!(c.tenant.as_str(), "acme");
    assert_eq!(c.reason, "contract ended");
    assert_eq!(c.requested_by, "dpo@acme.example");
    assert_eq!(c.method, "cryptographic erase");
    assert_eq!(c.keys.len(), 1);
    assert_eq!(c.keys[0].reference.to_string(), "local:acme");
    assert_eq!(
        serde_json::to_value(c.keys[0].action).unwrap(),
        "material_destroyed"
    );
    assert!(c.verification.passed);
    assert_eq!(c.verification.envelopes.len(), 1);
    assert_eq!(c.verification.envelopes[0].outcome, "refused");
    assert_eq!(
        c.verification.envelopes[0].error_kind.as_deref(),
        Some("key_unavailable")
    );
    assert_eq!(c.scope.envelopes, vec![1]);
    assert_eq!(verified.record.event, "shred.certificate.begin");
    let r = verify_file(&cli, &out);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(": valid"), "{}", r.stdout);
    let online = run_env(
        &cli,
        &[
            "certificate",
            "verify",
            out.to_str().unwrap(),
            "--online",
            "--json",
        ],
        &[],
    );
    assert_eq!(online.code, 0, "{}{}", online.stdout, online.stderr);
    let o = online.json();
    assert_eq!(o["ok"], true, "{o}");
    assert_eq!(o["result"]["online"]["ok"], true, "{o}");
    assert_eq!(
        o["result"]["online"]["keys"][0]["state"]["state"],
        "destroyed"
    );

    // Each step recorded before and after, in order, in a log that verifies.
    let log = fs::read_to_string(cli.path().join("state/audit/log.jsonl")).unwrap();
    let events: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .filter(|e| e.starts_with("shred."))
        .collect();
    let mut want = vec!["shred.begin".to_owned()];
    for step in ["fence", "scope", "keys", "delete", "verify", "certificate"] {
        want.push(format!("shred.{step}.begin"));
        want.push(format!("shred.{step}.end"));
    }
    want.push("shred.end".into());
    assert_eq!(events, want);
    ok(&cli, &["audit", "verify"]);

    // Only the descriptor is left; the key file is gone, a tombstone remains.
    let left: Vec<String> = cli.objects("acme").into_keys().collect();
    assert_eq!(left, vec!["tenant.json".to_owned()]);
    assert!(!cli.path().join("keys/acme.key").exists());
    assert!(cli.path().join("keys/acme.destroyed").exists());
    let d = descriptor(&cli, "acme");
    assert_eq!(d["state"], "shredded");
    assert_eq!(d["epochs"][0]["state"], "shredded");
    assert!(
        d["shredding"]["progress"]["scope"]
            .get("captured")
            .is_none(),
        "captured envelopes are dropped once certified"
    );

    // The fence afterwards: every job names the shred.
    let target = cli.path().join("restored");
    for args in [
        vec!["backup", "acme"],
        vec![
            "restore",
            "acme",
            &snapshot,
            "--target",
            target.to_str().unwrap(),
        ],
        vec!["drill", "acme"],
        vec!["rotate", "acme", "--new-epoch"],
        vec!["rotate", "acme", "--cmk"],
    ] {
        let r = run_env(&cli, &args, &[]);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.contains("tenant acme shredded on") || r.stderr.contains("shredded"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = run_env(&cli, &["backup", "acme"], &[]);
    assert!(r.stderr.contains("tenant acme shredded on"), "{}", r.stderr);
    let r = run_env(&cli, &["tenant", "init", "acme"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("shredded on"), "{}", r.stderr);

    // A re-run is idempotent: the same certificate, nothing new.
    let again =
        ok(&cli, &["shred", "acme", "--confirm", "acme", "--json"]).json()["result"].clone();
    assert_eq!(again["already_done"], true);
    assert_eq!(again["certificate_id"], res["certificate_id"]);
    assert_eq!(certificates(&cli, "acme").len(), 1);

    // The id can be reused, as a new lineage with a new key.
    let r = ok(
        &cli,
        &[
            "tenant",
            "init",
            "acme",
            "--allow-reuse",
            "--key",
            "local:acme-new",
            "--json",
        ],
    );
    assert_eq!(r.json()["result"]["epoch"], 2);
}

#[test]
fn tampered_certificates_fail_verification() {
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    let key_pub = public_key(&cli);
    let out = cli.path().join("cert.json");
    ok(
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
    let good = fs::read(&out).unwrap();
    certificate::verify(&good, &key_pub).unwrap();
    // Every byte, flipped two ways: each edit must fail verification.
    for i in 0..good.len() {
        for mask in [0x01u8, 0x20] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            assert!(
                certificate::verify(&bad, &key_pub).is_err(),
                "byte {i} ^ {mask:#x} ({:?}) went unnoticed",
                good[i] as char
            );
        }
    }
    // Reformatting (same JSON, other bytes) and a truncation fail too.
    let pretty: Value = serde_json::from_slice(&good).unwrap();
    let reformatted = serde_json::to_vec(&pretty).unwrap();
    assert_eq!(
        certificate::verify(&reformatted, &key_pub).unwrap_err(),
        certificate::CertificateError::NotCanonical
    );
    assert!(certificate::verify(&good[..good.len() - 1], &key_pub).is_err());
    // Another key does not verify it.
    let other = custos::audit::AuditKey::from_seed(&[7; 32]).public_key_text();
    assert!(matches!(
        certificate::verify(&good, &other),
        Err(certificate::CertificateError::WrongSigner { .. })
    ));
    // And through the binary: one edited field, exit 1.
    let text = String::from_utf8(good.clone()).unwrap();
    let edited = text.replacen("\"objects_deleted\": ", "\"objects_deleted\": 1", 1);
    assert_ne!(edited, text);
    let bad = cli.path().join("bad.json");
    fs::write(&bad, edited).unwrap();
    let r = verify_file(&cli, &bad);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("INVALID"), "{}", r.stdout);
}

#[test]
fn legal_hold_refuses_a_shred() {
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    let policy = cli.path().join("policies/acme.toml");
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str(
        "[deletion]\nstate = \"offboarding\"\nrequested_at = \"2020-01-01T00:00:00Z\"\ngrace = \"1d\"\nlegal_hold = true\n",
    );
    fs::write(&policy, text).unwrap();
    let r = run_env(&cli, &["shred", "acme", "--confirm", "acme", "--json"], &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["error"]["kind"], "legal_hold");
    assert!(
        r.stderr.contains("\"event\":\"shred.refused\""),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("\"reason\":\"legal_hold\""),
        "{}",
        r.stderr
    );
    assert_eq!(descriptor(&cli, "acme")["state"], "active");
    assert!(cli.path().join("keys/acme.key").exists());
}

/// Killed after its certificate was stored and recorded (`certified`): the
/// re-run adopts that certificate, also after a second kill there and with
/// a skip list given on the re-run; never signs another. With the file gone
/// from the store, the re-run refuses and signs nothing; with the descriptor
/// edited to say steps are left, it refuses and runs none, and once the
/// descriptor is put back it finishes.
#[test]
fn a_shred_killed_after_its_certificate_adopts_it_or_refuses() {
    let cli = installation(&["twice", "gone", "edited"]);
    let key_pub = public_key(&cli);
    for t in ["twice", "gone", "edited"] {
        ok(&cli, &["backup", t]);
        let r = run_env(
            &cli,
            &["shred", t, "--confirm", t],
            &[("CUSTOS_CRASH_AT", "shred:certified")],
        );
        assert_eq!(r.code, -1, "{t}: {}", r.stderr);
        assert_eq!(
            certificates(&cli, t).len(),
            1,
            "{t}: stored before the kill"
        );
    }
    let stored = fs::read(&certificates(&cli, "twice")[0]).unwrap();
    // Killed again at the same point, then re-run with a skip list.
    let r = run_env(
        &cli,
        &["shred", "twice", "--confirm", "twice"],
        &[("CUSTOS_CRASH_AT", "shred:certified")],
    );
    assert_eq!(r.code, -1, "{}", r.stderr);
    let r = ok(
        &cli,
        &[
            "shred",
            "twice",
            "--confirm",
            "twice",
            "--skip-unproven-key",
            "local:twice",
            "--json",
        ],
    );
    assert_eq!(descriptor(&cli, "twice")["state"], "shredded");
    let certs = certificates(&cli, "twice");
    assert_eq!(certs.len(), 1);
    assert_eq!(
        fs::read(&certs[0]).unwrap(),
        stored,
        "adopted, not signed again"
    );
    certificate::verify(&stored, &key_pub).unwrap();
    assert_eq!(
        r.json()["result"]["certificate_id"].as_str().unwrap(),
        certs[0].file_stem().unwrap().to_str().unwrap()
    );
    // The certificate removed from the store: nothing is signed again.
    fs::remove_file(&certificates(&cli, "gone")[0]).unwrap();
    refused(
        &cli,
        "gone",
        &["does not sign again", "is not in the store"],
    );
    assert!(certificates(&cli, "gone").is_empty());
    assert_eq!(descriptor(&cli, "gone")["state"], "shredding");
    // The descriptor edited back to before the verification.
    let path = cli.store().join("tenants/edited/tenant.json");
    let saved = fs::read(&path).unwrap();
    let mut d: Value = serde_json::from_slice(&saved).unwrap();
    let progress = &mut d["shredding"]["progress"];
    progress["step"] = Value::from("deleted");
    progress.as_object_mut().unwrap().remove("verification");
    fs::write(&path, serde_json::to_vec(&d).unwrap()).unwrap();
    let audit = || fs::read_to_string(cli.path().join("state/audit/log.jsonl")).unwrap();
    let verify_records = || audit().matches("shred.verify.begin").count();
    let before = verify_records();
    refused(&cli, "edited", &["as certified", "steps are left"]);
    assert_eq!(verify_records(), before, "no step ran again");
    fs::write(&path, &saved).unwrap();
    ok(&cli, &["shred", "edited", "--confirm", "edited"]);
    assert_eq!(descriptor(&cli, "edited")["state"], "shredded");
    assert_eq!(certificates(&cli, "edited").len(), 1);
}

/// Kills `custos shred` at each step (CUSTOS_CRASH_AT test hook), then
/// re-runs it: every shred completes with exactly one valid certificate.
#[test]
fn a_shred_killed_at_any_step_completes_on_rerun() {
    let points = shred::hook::TENANT_POINTS;
    let tenants: Vec<String> = (0..points.len()).map(|i| format!("t{i}")).collect();
    let names: Vec<&str> = tenants.iter().map(String::as_str).collect();
    let cli = installation(&names);
    let key_pub = public_key(&cli);
    for t in &names {
        ok(&cli, &["backup", t]);
    }
    for (t, point) in names.iter().zip(points) {
        let hook = format!("shred:{point}");
        let r = run_env(
            &cli,
            &["shred", t, "--confirm", t],
            &[("CUSTOS_CRASH_AT", &hook)],
        );
        assert_eq!(r.code, -1, "{hook} did not abort the process: {}", r.stderr);
        assert!(r.stderr.contains("test hook"), "{}", r.stderr);
        assert_ne!(
            descriptor(&cli, t)["state"],
            "active",
            "{hook}: fenced first"
        );
    }
    // The aborted runs still hold their leases: wait for them to expire.
    std::thread::sleep(std::time::Duration::from_secs(11));
    for (t, point) in names.iter().zip(points) {
        let r = run_env(&cli, &["shred", t, "--confirm", t, "--json"], &[]);
        assert_eq!(
            r.code, 0,
            "re-run after {point}: {}\n{}",
            r.stdout, r.stderr
        );
        let res = r.json()["result"].clone();
        assert_eq!(res["already_done"], false, "{point}");
        assert!(res["resumed_after"].is_string(), "{point}: {res}");
        let certs = certificates(&cli, t);
        assert_eq!(certs.len(), 1, "{point}: one certificate");
        let v = certificate::verify(&fs::read(&certs[0]).unwrap(), &key_pub)
            .unwrap_or_else(|e| panic!("{point}: {e}"));
        assert_eq!(v.certificate.id, res["certificate_id"].as_str().unwrap());
        assert!(v.certificate.verification.passed);
        assert_eq!(descriptor(&cli, t)["state"], "shredded", "{point}");
        let left: Vec<String> = cli.objects(t).into_keys().collect();
        assert_eq!(left, vec!["tenant.json".to_owned()], "{point}");
        assert!(
            !cli.path().join(format!("keys/{t}.key")).exists(),
            "{point}"
        );
    }
    ok(&cli, &["audit", "verify"]);
}

// ---------------------------------------------------------------------------
// Epoch shreds

#[tokio::test(flavor = "multi_thread")]
async fn epoch_shred_with_and_without_rewrap() {
    let cli = installation(&["acme"]);
    let key_pub = public_key(&cli);
    ok(&cli, &["backup", "acme"]);
    assert_eq!(roll_epoch(&cli, "acme"), 2);
    fs::write(cli.path().join("src/acme/new.txt"), "epoch 2\n").unwrap();
    ok(&cli, &["backup", "acme"]);
    let snaps = ok(&cli, &["snapshots", "acme", "--json"]).json()["result"]["snapshots"].clone();
    let old = snaps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["epoch"] == 1)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The current epoch cannot be shredded.
    let r = run_env(
        &cli,
        &["shred", "acme", "--epoch", "2", "--confirm", "acme"],
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("current epoch"), "{}", r.stderr);
    assert!(
        r.stderr.contains("roll a new epoch") || r.stderr.contains("Roll a new epoch"),
        "{}",
        r.stderr
    );
    // Nor one whose snapshots are still there: they are named.
    let r = run_env(
        &cli,
        &["shred", "acme", "--epoch", "1", "--confirm", "acme"],
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains(&old[..8]), "{}", r.stderr);
    assert!(r.stderr.contains("still needed"), "{}", r.stderr);
    // A dry run refuses what the shred refuses.
    let r = run_env(&cli, &["shred", "acme", "--epoch", "1", "--dry-run"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("still needed"), "{}", r.stderr);

    ok(&cli, &["forget", "acme", "--keep-last", "1"]);
    let plan = ok(
        &cli,
        &["shred", "acme", "--epoch", "1", "--dry-run", "--json"],
    )
    .json()["result"]
        .clone();
    assert_eq!(plan["state"], "start");
    assert_eq!(
        plan["keys"],
        serde_json::json!([]),
        "no key ends without a re-wrap"
    );
    assert!(plan["objects"].as_u64().unwrap() >= 1, "{plan}");
    assert!(cli.store().join("tenants/acme/keys/1").exists());
    let r = ok(
        &cli,
        &[
            "shred",
            "acme",
            "--epoch",
            "1",
            "--confirm",
            "acme",
            "--json",
        ],
    );
    let res = r.json()["result"].clone();
    assert_eq!(res["epoch"], 1);
    assert_eq!(res["guarantee"], "envelope_deleted");
    let certs = certificates(&cli, "acme");
    assert_eq!(certs.len(), 1);
    let v = certificate::verify(&fs::read(&certs[0]).unwrap(), &key_pub).unwrap();
    assert_eq!(v.certificate.epoch, Some(1));
    assert!(v.certificate.keys.is_empty());
    assert!(v.certificate.guarantee.pending.is_some());
    assert_eq!(v.certificate.verification.envelope_absent, Some(true));
    assert!(!cli.store().join("tenants/acme/keys/1").exists());
    assert!(
        cli.path().join("keys/acme.key").exists(),
        "the key lives on"
    );
    let d = descriptor(&cli, "acme");
    assert_eq!(d["epochs"][0]["state"], "shredded");
    assert_eq!(d["epochs"][0]["certificate_id"], res["certificate_id"]);
    assert!(d.get("epoch_shred").is_none());
    // The tenant lives on: check, backup and restore work.
    ok(&cli, &["check", "acme"]);
    ok(&cli, &["backup", "acme"]);
    let target = cli.path().join("restored");
    ok(
        &cli,
        &[
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(fs::read(target.join("data/new.txt")).unwrap(), b"epoch 2\n");
    // A re-run returns the same certificate.
    let again = ok(
        &cli,
        &[
            "shred",
            "acme",
            "--epoch",
            "1",
            "--confirm",
            "acme",
            "--json",
        ],
    );
    assert_eq!(again.json()["result"]["already_done"], true);

    // Epoch 2 with a re-wrap: epoch 3 moves to local:acme-2, local:acme is destroyed.
    assert_eq!(roll_epoch(&cli, "acme"), 3);
    fs::write(cli.path().join("src/acme/new.txt"), "epoch 3\n").unwrap();
    ok(&cli, &["backup", "acme"]);
    ok(&cli, &["forget", "acme", "--keep-last", "1"]);
    let envelope2 = fs::read(cli.store().join("tenants/acme/keys/2")).unwrap();
    let r = ok(
        &cli,
        &[
            "shred",
            "acme",
            "--epoch",
            "2",
            "--rewrap",
            "--confirm",
            "acme",
            "--json",
        ],
    );
    let res = r.json()["result"].clone();
    assert_eq!(res["guarantee"], "keys_destroyed", "{res}");
    let certs = certificates(&cli, "acme");
    assert_eq!(certs.len(), 2);
    let cert = certs
        .iter()
        .map(|p| certificate::verify(&fs::read(p).unwrap(), &key_pub).unwrap())
        .find(|v| v.certificate.epoch == Some(2))
        .unwrap()
        .certificate;
    assert_eq!(cert.rewrap.as_ref().unwrap().to.to_string(), "local:acme-2");
    assert_eq!(cert.rewrap.as_ref().unwrap().epochs, vec![3]);
    assert_eq!(cert.keys.len(), 1);
    assert_eq!(cert.keys[0].reference.to_string(), "local:acme");
    assert_eq!(cert.verification.envelopes[0].outcome, "refused");
    let d = descriptor(&cli, "acme");
    assert_eq!(d["key"], "local:acme-2");
    assert!(
        d["previous_keys"]
            .as_array()
            .unwrap()
            .contains(&"local:acme".into())
    );
    assert!(!cli.path().join("keys/acme.key").exists());
    assert!(cli.path().join("keys/acme.destroyed").exists());
    // A stale copy of epoch 2's envelope no longer unwraps.
    let ctx = context(&cli).await;
    let env = custos::format::envelope::Envelope::parse(&envelope2).unwrap();
    let err = ctx
        .keys
        .key(&env.key)
        .unwrap()
        .unwrap(&env.wrapped, &env.context())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "key_unavailable", "{err}");
    // The policy still names the old key: jobs say to update it.
    let r = run_env(&cli, &["backup", "acme"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("key = \"local:acme-2\""), "{}", r.stderr);
    set_policy_key(&cli, "acme", "local:acme-2");
    // The remaining epoch is intact under the new key.
    ok(&cli, &["check", "acme"]);
    ok(&cli, &["backup", "acme"]);
    let target = cli.path().join("restored3");
    ok(
        &cli,
        &[
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(fs::read(target.join("data/new.txt")).unwrap(), b"epoch 3\n");
    ok(&cli, &["audit", "verify"]);
}

/// An epoch shred with a re-wrap, killed at each of its points, completes on re-run.
#[tokio::test(flavor = "multi_thread")]
async fn an_epoch_shred_killed_at_any_step_completes_on_rerun() {
    let points = shred::hook::EPOCH_POINTS;
    let tenants: Vec<String> = (0..points.len()).map(|i| format!("e{i}")).collect();
    let names: Vec<&str> = tenants.iter().map(String::as_str).collect();
    let cli = installation(&names);
    let key_pub = public_key(&cli);
    for t in &names {
        ok(&cli, &["backup", t]);
        roll_epoch(&cli, t);
        ok(&cli, &["backup", t]);
        roll_epoch(&cli, t);
        ok(&cli, &["backup", t]);
        ok(&cli, &["forget", t, "--keep-last", "1"]);
    }
    for (t, point) in names.iter().zip(points) {
        let hook = format!("shred-epoch:{point}");
        let r = run_env(
            &cli,
            &["shred", t, "--epoch", "1", "--rewrap", "--confirm", t],
            &[("CUSTOS_CRASH_AT", &hook)],
        );
        assert_eq!(
            r.code, -1,
            "{hook} did not abort: {}\n{}",
            r.stdout, r.stderr
        );
    }
    std::thread::sleep(std::time::Duration::from_secs(11));
    // An unfinished epoch shred owns the tenant's keys: no rotation of any
    // kind, dry run or not, until it ends.
    let mut fenced = 0;
    for t in &names {
        if descriptor(&cli, t).get("epoch_shred").is_none() {
            continue;
        }
        fenced += 1;
        // Past its re-wrap the tenant is under the fresh key: the policy must
        // name it, or the rotation is refused before it gets that far.
        let key = descriptor(&cli, t)["key"].as_str().unwrap().to_owned();
        let policy = cli.path().join(format!("policies/{t}.toml"));
        let original = fs::read_to_string(&policy).unwrap();
        set_policy_key(&cli, t, &key);
        for how in [&["--cmk"][..], &["--new-epoch"], &["--cmk", "--dry-run"]] {
            let r = run_env(&cli, &[&["rotate", t][..], how].concat(), &[]);
            assert_eq!(r.code, 1, "rotate {how:?}: {}\n{}", r.stdout, r.stderr);
            assert!(
                r.stderr.contains("unfinished shred of epoch 1")
                    && r.stderr.contains("--rewrap or --rewrap-to"),
                "rotate {how:?}: {}",
                r.stderr
            );
        }
        fs::write(&policy, original).unwrap();
    }
    assert!(
        fenced >= points.len() - 1,
        "{fenced} shreds left unfinished"
    );
    for (t, point) in names.iter().zip(points) {
        let r = run_env(
            &cli,
            &[
                "shred",
                t,
                "--epoch",
                "1",
                "--rewrap",
                "--confirm",
                t,
                "--json",
            ],
            &[],
        );
        assert_eq!(
            r.code, 0,
            "re-run after {point}: {}\n{}",
            r.stdout, r.stderr
        );
        let certs = certificates(&cli, t);
        assert_eq!(certs.len(), 1, "{point}");
        let v = certificate::verify(&fs::read(&certs[0]).unwrap(), &key_pub)
            .unwrap_or_else(|e| panic!("{point}: {e}"));
        assert_eq!(
            v.certificate.guarantee.kind,
            shred::GuaranteeKind::KeysDestroyed
        );
        assert_eq!(
            v.certificate.rewrap.as_ref().unwrap().epochs,
            vec![2, 3],
            "{point}"
        );
        let d = descriptor(&cli, t);
        assert_eq!(d["key"], format!("local:{t}-2"), "{point}");
        assert!(d.get("epoch_shred").is_none(), "{point}");
        set_policy_key(&cli, t, &format!("local:{t}-2"));
        assert!(
            !cli.path().join(format!("keys/{t}.key")).exists(),
            "{point}"
        );
        let target = cli.path().join(format!("restored-{t}"));
        ok(
            &cli,
            &["restore", t, "latest", "--target", target.to_str().unwrap()],
        );
    }
    ok(&cli, &["audit", "verify"]);
}

// ---------------------------------------------------------------------------
// A tenant's whole life, then a search for its key bytes everywhere.

fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    vec![
        ("raw".into(), secret.to_vec()),
        ("hex".into(), hex::encode(secret).into_bytes()),
        ("HEX".into(), hex::encode_upper(secret).into_bytes()),
        ("base64".into(), STANDARD.encode(secret).into_bytes()),
        (
            "base64-nopad".into(),
            STANDARD_NO_PAD.encode(secret).into_bytes(),
        ),
        ("base64url".into(), URL_SAFE.encode(secret).into_bytes()),
        (
            "base64url-nopad".into(),
            URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        ),
    ]
}

/// Where any encoding of any secret occurs in the files.
fn scan(files: &[PathBuf], secrets: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let bytes = fs::read(f).unwrap();
        for (what, secret) in secrets {
            for (enc, needle) in encodings(secret) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                    found.push(format!("{what} ({enc}) in {}", f.display()));
                }
            }
        }
    }
    found
}

fn all_files(root: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            all_files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_life_leaves_no_key_bytes_anywhere() {
    let cli = installation(&["acme"]);
    let tmp = cli.path().join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let logs = cli.path().join("logs");
    fs::create_dir_all(&logs).unwrap();
    let mut step = 0;
    let mut run = |args: &[&str]| {
        let r = run_env(
            &cli,
            args,
            &[("CUSTOS_LOG", "debug"), ("TMPDIR", tmp.to_str().unwrap())],
        );
        step += 1;
        fs::write(logs.join(format!("{step:02}-stderr.jsonl")), &r.stderr).unwrap();
        fs::write(logs.join(format!("{step:02}-stdout.txt")), &r.stdout).unwrap();
        assert_eq!(r.code, 0, "custos {args:?}: {}\n{}", r.stdout, r.stderr);
        r
    };
    run(&["tenant", "init", "acme"]);
    run(&["backup", "acme"]);
    fs::write(cli.path().join("src/acme/more.txt"), "more\n").unwrap();
    run(&["backup", "acme"]);
    run(&["drill", "acme", "--json"]);
    // Rotation: new CMK material (a second key version), then a new epoch.
    run(&["rotate", "acme", "--cmk"]);
    run(&["rotate", "acme", "--new-epoch"]);
    run(&["backup", "acme"]);
    run(&["drill", "acme", "--json"]);
    run(&["check", "acme", "--read-data"]);
    run(&["tenant", "show", "acme", "--json"]);

    // The secrets, learned before the shred: the CMK material from the key
    // file, the data keys by unwrapping every envelope with the library.
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let key_file: Value =
        serde_json::from_slice(&fs::read(cli.path().join("keys/acme.key")).unwrap()).unwrap();
    for v in key_file["versions"].as_array().unwrap() {
        let m = base64::engine::general_purpose::STANDARD
            .decode(v["material"].as_str().unwrap())
            .unwrap();
        assert_eq!(m.len(), 32);
        secrets.push((format!("CMK version {}", v["version"]), m));
    }
    {
        let ctx = context(&cli).await;
        let repo = Repo::open(&ctx, &TenantId::new("acme").unwrap(), None)
            .await
            .unwrap();
        for e in [1u32, 2] {
            let env = repo.load_envelope(e).await.unwrap();
            let dk = ctx
                .keys
                .key(&env.key)
                .unwrap()
                .unwrap(&env.wrapped, &env.context())
                .await
                .unwrap();
            secrets.push((format!("data key of epoch {e}"), dk.expose().to_vec()));
        }
    }
    assert_eq!(secrets.len(), 4, "two CMK versions, two data keys");
    // The search works: before the shred, the key file holds the CMK (base64).
    let control = scan(&[cli.path().join("keys/acme.key")], &secrets);
    assert!(
        control
            .iter()
            .any(|f| f.starts_with("CMK version 1 (base64)")),
        "{control:?}"
    );

    let r = run(&["shred", "acme", "--confirm", "acme", "--json"]);
    assert_eq!(r.json()["result"]["guarantee"], "keys_destroyed");
    run(&[
        "certificate",
        "verify",
        certificates(&cli, "acme")[0].to_str().unwrap(),
        "--online",
    ]);
    run(&["audit", "show", "--json"]);

    let mut files = Vec::new();
    all_files(cli.path(), &mut files);
    assert!(files.len() > 20, "{files:?}");
    let found = scan(&files, &secrets);
    let scanned: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert!(
        found.is_empty(),
        "key bytes found after the shred: {found:#?}"
    );
    eprintln!(
        "searched {} files ({scanned} bytes) for {} secrets in 7 encodings: none found",
        files.len(),
        secrets.len()
    );
}

// ---------------------------------------------------------------------------
// Library: a store that refuses to delete some objects (as Object Lock does).

#[derive(Debug)]
struct Locked {
    inner: Arc<dyn ObjectStore>,
    /// Paths it refuses to delete.
    locked: fn(&str) -> bool,
}

impl std::fmt::Display for Locked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Locked")
    }
}

#[async_trait]
impl ObjectStore for Locked {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &StorePath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn get_ranges(
        &self,
        location: &StorePath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<StorePath>>,
    ) -> BoxStream<'static, object_store::Result<StorePath>> {
        let inner = self.inner.clone();
        let locked = self.locked;
        locations
            .then(move |p| {
                let inner = inner.clone();
                async move {
                    let p = p?;
                    if locked(p.as_ref()) {
                        return Err(object_store::Error::PermissionDenied {
                            path: p.to_string(),
                            source: "AccessDenied: object is WORM protected (Object Lock)".into(),
                        });
                    }
                    inner.delete(&p).await.map(|_| p)
                }
            })
            .boxed()
    }
    fn list(
        &self,
        prefix: Option<&StorePath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&StorePath>,
        offset: &StorePath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&StorePath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
    async fn rename_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_the_store_refuses_to_delete_are_retained_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_data(&root.join("data"), "acme");
    let store: Arc<dyn ObjectStore> = Arc::new(Locked {
        inner: custos::store::local::open(&root.join("store")).unwrap(),
        locked: |p| p.contains("/packs/"),
    });
    let ctx = Context::with_store(store, "s3://locked-bucket/custos".into(), root).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &key, false).await.unwrap();
    common::backup_dir(&ctx, &repo, &root.join("data")).await;
    drop(repo);
    let packs = fs::read_dir(root.join("store/tenants/acme/packs"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    assert!(packs >= 1);

    let req = ShredRequest {
        target: ShredTarget::Tenant,
        reason: "offboarding".into(),
        requested_by: "test".into(),
        requested_at: None,
        pending_window_days: 7,
        legal_hold: false,
        skip_unproven: Vec::new(),
    };
    let run = shred::run_job(&ctx, &tenant, Some(&key), &req).await;
    let report = run.result.unwrap();
    assert_eq!(report.objects_retained as usize, packs);
    let key_text = ctx.audit.as_ref().unwrap().key().public_key_text();
    let v = certificate::verify(&report.certificate_bytes, &key_text).unwrap();
    let c = v.certificate;
    assert_eq!(c.deletion.retained.len(), packs);
    for r in &c.deletion.retained {
        assert!(r.object.starts_with("tenants/acme/packs/"), "{r:?}");
        assert!(r.reason.contains("Object Lock"), "{r:?}");
    }
    assert!(
        c.deletion
            .note
            .as_deref()
            .unwrap()
            .contains("versioned bucket")
    );
    assert_eq!(c.store.url, "s3://locked-bucket/custos");
    let sample = c.verification.pack_sample.as_ref().unwrap();
    assert!(sample.present);
    assert_eq!(sample.outcome, "undecryptable");
    assert_eq!(c.verification.remaining_objects as usize, packs);
    assert!(c.verification.passed);
    // The tenant is shredded; the locked packs stay, unreadable.
    let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
    assert!(repo.require_active("restore").is_err());

    // The report of the job is in the state directory, with the certificate id.
    let reports = ctx.state.read_reports(&tenant, None).unwrap();
    assert_eq!(reports[0]["job"], "shred");
    assert_eq!(reports[0]["result"]["certificate_id"], c.id.as_str());
}

/// A shred of an epoch without a re-wrap whose envelope the store retains
/// (Object Lock) cannot verify. Rotations still run beside it once it has
/// deleted (a CMK replacement is how the retained envelope becomes
/// unreadable), and never write that envelope again.
#[tokio::test(flavor = "multi_thread")]
async fn a_shred_stuck_on_a_retained_envelope_leaves_rotation_possible() {
    use custos::jobs::rotate::{self, RotateAction};
    use custos::store::lease::LeaseGuard;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_data(&root.join("data"), "acme");
    let store: Arc<dyn ObjectStore> = Arc::new(Locked {
        inner: custos::store::local::open(&root.join("store")).unwrap(),
        locked: |p| p.ends_with("/keys/1"),
    });
    let ctx = Context::with_store(store, "s3://locked-bucket/custos".into(), root).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();
    let rotate = |action: RotateAction| {
        let ctx = ctx.clone();
        let tenant = tenant.clone();
        async move {
            let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
            let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "rotate", ctx.lease_ttl)
                .await
                .unwrap();
            let r = rotate::run(&repo, &lease, &action).await;
            lease.release().await;
            r
        }
    };
    let (repo, _) = Repo::init(&ctx, &tenant, &key, false).await.unwrap();
    common::backup_dir(&ctx, &repo, &root.join("data")).await;
    drop(repo);
    rotate(RotateAction::NewEpoch).await.unwrap();
    let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
    common::backup_dir(&ctx, &repo, &root.join("data")).await;
    let lease = LeaseGuard::acquire(repo.store(), &ctx.holder, "forget", ctx.lease_ttl)
        .await
        .unwrap();
    custos::jobs::forget::run(
        &repo,
        &lease,
        &custos::config::policy::KeepRules {
            keep_last: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    lease.release().await;
    drop(repo);
    let envelope = root.join("store/tenants/acme/keys/1");
    let retained = fs::read(&envelope).unwrap();
    let req = ShredRequest {
        target: ShredTarget::Epoch {
            epoch: 1,
            rewrap: None,
        },
        reason: "retention".into(),
        requested_by: "test".into(),
        requested_at: None,
        pending_window_days: 7,
        legal_hold: false,
        skip_unproven: Vec::new(),
    };
    let res = shred::run_job(&ctx, &tenant, Some(&key), &req).await.result;
    assert!(res.is_err(), "verified although the envelope is retained");
    let d = Repo::open(&ctx, &tenant, None)
        .await
        .unwrap()
        .descriptor()
        .clone();
    assert!(d.epoch_shred.is_some());
    for action in [RotateAction::Cmk, RotateAction::NewEpoch] {
        let report = rotate(action.clone())
            .await
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert!(
            report.envelopes.iter().all(|e| e.epoch != 1),
            "{action:?} re-wrapped the epoch being shredded: {:?}",
            report.envelopes
        );
    }
    assert_eq!(
        fs::read(&envelope).unwrap(),
        retained,
        "the retained envelope was written"
    );
}

/// What the daemon does with an offboarding tenant: under legal hold the
/// decision is `LegalHold` and a shred request from the policy is refused
/// anyway; once the hold is lifted it is due and runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_path_honours_a_legal_hold() {
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    let policy_file = cli.path().join("policies/acme.toml");
    let mut text = fs::read_to_string(&policy_file).unwrap();
    text.push_str(
        "[deletion]\nstate = \"offboarding\"\nrequested_at = \"2020-01-01T00:00:00Z\"\ngrace = \"30d\"\nlegal_hold = true\nkms_pending_window_days = 7\n",
    );
    fs::write(&policy_file, &text).unwrap();
    let cfg = custos::config::Config::discover(Some(&cli.path().join("custos.toml"))).unwrap();
    let load =
        || custos::config::load_policy_file(&cfg.policies_dir, Path::new("acme.toml")).unwrap();
    let mut ctx = context(&cli).await;
    ctx.actor = "daemon:test".into();
    let tenant = TenantId::new("acme").unwrap();
    let policy = load();
    let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
    let decision = shred::daemon_decision(
        &tenant,
        &policy.deletion,
        Some(repo.descriptor()),
        Utc::now(),
    );
    assert_eq!(decision, shred::ShredDecision::LegalHold);
    assert!(!decision.should_run());
    drop(repo);
    // Even if asked, the job refuses.
    let req = ShredRequest::from_policy(&policy, &ctx.actor);
    assert!(req.legal_hold);
    let run = shred::run_job(&ctx, &tenant, Some(&policy.key), &req).await;
    assert_eq!(run.result.unwrap_err().kind(), "legal_hold");
    assert_eq!(descriptor(&cli, "acme")["state"], "active");

    // Hold lifted: due, and the daemon's request shreds the tenant.
    fs::write(
        &policy_file,
        text.replace("legal_hold = true", "legal_hold = false"),
    )
    .unwrap();
    let policy = load();
    let decision = shred::decide(&ctx, &policy, Utc::now()).await.unwrap();
    assert_eq!(decision, shred::ShredDecision::Due);
    let req = ShredRequest::from_policy(&policy, &ctx.actor);
    let report = shred::run_job(&ctx, &tenant, Some(&policy.key), &req)
        .await
        .result
        .unwrap();
    let key_text = ctx.audit.as_ref().unwrap().key().public_key_text();
    let c = certificate::verify(&report.certificate_bytes, &key_text)
        .unwrap()
        .certificate;
    assert_eq!(c.actor, "daemon:test");
    assert_eq!(c.requested_at.to_rfc3339(), "2020-01-01T00:00:00+00:00");
    assert!(c.reason.contains("offboarding requested"), "{}", c.reason);
    let repo = Repo::open(&ctx, &tenant, None).await.unwrap();
    assert!(matches!(
        shred::due(&policy.deletion, Some(repo.descriptor()), Utc::now()),
        shred::ShredDecision::Shredded { .. }
    ));
}

/// docs/shredding.md is enough to check a certificate without custos:
/// scripts/verify-certificate.py (Python, `cryptography` only) accepts a
/// certificate and rejects an edited one.
#[test]
fn an_independent_verifier_accepts_the_certificate() {
    let Some(py) = std::env::var_os("CUSTOS_TEST_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    else {
        common::require(false, "CUSTOS_TEST_PYTHON (a python with cryptography)");
        return;
    };
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    public_key(&cli);
    let out = cli.path().join("cert.json");
    ok(
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/verify-certificate.py");
    let check = |file: &Path| {
        Command::new(&py)
            .arg(&script)
            .arg(file)
            .arg(cli.path().join("audit.pub"))
            .output()
            .unwrap()
    };
    let r = check(&out);
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("valid: tenant acme"));
    let mut bad = fs::read(&out).unwrap();
    let i = bad.len() / 2;
    bad[i] ^= 0x01;
    let bad_file = cli.path().join("bad.json");
    fs::write(&bad_file, bad).unwrap();
    let r = check(&bad_file);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("INVALID"));
}

/// An index file of a shredded epoch that the store kept (Object Lock, a
/// versioned bucket, or put back by whoever writes the store) is ciphertext
/// nobody can read: it must not take the tenant's live epochs down with it.
/// It once failed every later restore, check and backup with `epoch_shredded`.
#[test]
fn a_retained_index_of_a_shredded_epoch_does_not_break_the_tenant() {
    let cli = installation(&["acme"]);
    ok(&cli, &["backup", "acme"]);
    assert_eq!(roll_epoch(&cli, "acme"), 2);
    fs::write(cli.path().join("src/acme/new.txt"), "epoch 2\n").unwrap();
    ok(&cli, &["backup", "acme"]);
    let index_dir = cli.path().join("store/tenants/acme/index");
    let kept: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&index_dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    ok(&cli, &["forget", "acme", "--keep-last", "1"]);
    ok(
        &cli,
        &[
            "shred",
            "acme",
            "--epoch",
            "1",
            "--confirm",
            "acme",
            "--reason",
            "test",
        ],
    );
    let mut put_back = 0;
    for (path, bytes) in &kept {
        if !path.exists() {
            fs::write(path, bytes).unwrap();
            put_back += 1;
        }
    }
    assert!(
        put_back >= 1,
        "the epoch shred deleted epoch 1's index file"
    );

    let target = cli.path().join("restored");
    ok(
        &cli,
        &[
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    let mut restored = Vec::new();
    all_files(&target, &mut restored);
    restored.retain(|p| p.ends_with("new.txt"));
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(fs::read_to_string(&restored[0]).unwrap(), "epoch 2\n");
    let check = ok(&cli, &["check", "acme", "--read-data", "--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    ok(&cli, &["backup", "acme"]);
}

/// A store writer who records a failed verification in an interrupted
/// shred's progress (here one copied from another tenant's certificate, as
/// "verified") gets no certificate signed: the re-run refuses, names the
/// problem, and stores no certificate.
#[test]
fn a_verification_recorded_as_failed_is_never_signed() {
    let cli = installation(&["v", "w"]);
    ok(&cli, &["backup", "v"]);
    ok(&cli, &["backup", "w"]);
    let r = run_env(
        &cli,
        &["shred", "v", "--confirm", "v"],
        &[("CUSTOS_CRASH_AT", "shred:verify")],
    );
    assert_eq!(
        r.code, -1,
        "the verify crash point did not abort: {}",
        r.stderr
    );
    ok(&cli, &["shred", "w", "--confirm", "w"]);
    let w_cert: Value =
        serde_json::from_slice(&fs::read(&certificates(&cli, "w")[0]).unwrap()).unwrap();
    let mut verification = w_cert["certificate"]["verification"].clone();
    if verification.is_null() {
        verification = w_cert["verification"].clone();
    }
    assert_eq!(verification["passed"], true, "{w_cert}");
    verification["passed"] = Value::Bool(false);

    let path = cli.store().join("tenants/v/tenant.json");
    let mut d: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let progress = &mut d["shredding"]["progress"];
    assert_eq!(progress["step"], "deleted", "{progress}");
    progress["step"] = Value::from("verified");
    progress["verification"] = verification;
    fs::write(&path, serde_json::to_vec(&d).unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(11));

    let r = run_env(&cli, &["shred", "v", "--confirm", "v", "--json"], &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = &r.json()["error"];
    assert_eq!(e["kind"], "shred_verification_failed", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("its verification record says the verification failed"),
        "{e}"
    );
    assert!(
        certificates(&cli, "v").is_empty(),
        "a certificate was stored"
    );
}

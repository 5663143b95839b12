//! What a shred states, held to what custos can stand behind: a key one of
//! the tenant's objects names but that cannot be tried (refused by
//! `[residency]`) is never left out of a shred; a fenced shred that meets a
//! refused key says what to change and resumes once it is changed; the times
//! and keys a certificate states are those custos recorded in its audit log,
//! not the store's descriptor; certificates of format `/1` still verify; and
//! `certificate verify --online` tells "could not check" from "not destroyed".
#![cfg(feature = "test-hooks")]

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::common::{self, Cli};

const EVIL: &str =
    "aws-kms:arn:aws:kms:eu-central-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666";

/// An installation with a short lease TTL and a backed-up tenant per name.
fn installation(tenants: &[&str]) -> Cli {
    let cli = Cli::new();
    cli.short_lease();
    for t in tenants {
        let src = cli.path().join("src").join(t);
        common::make_tree(&src, 5);
        cli.policy(t, &src);
        cli.ok(&["backup", t]);
    }
    cli
}

fn config_text(cli: &Cli) -> String {
    fs::read_to_string(cli.path().join("custos.toml")).unwrap()
}

fn set_config(cli: &Cli, text: &str) {
    fs::write(cli.path().join("custos.toml"), text).unwrap();
}

fn with_residency(cli: &Cli, rules: &str) {
    set_config(cli, &format!("{}[residency]\n{rules}", config_text(cli)));
}

fn descriptor(cli: &Cli, tenant: &str) -> Value {
    cli.descriptor(tenant)
}

fn certificates(cli: &Cli, tenant: &str) -> Vec<PathBuf> {
    let dir = cli.store().join("certificates").join(tenant);
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn certificate(path: &Path) -> Value {
    serde_json::from_slice::<Value>(&fs::read(path).unwrap()).unwrap()["certificate"].clone()
}

fn public_key(cli: &Cli) -> PathBuf {
    let r = cli.ok(&["audit", "public-key"]);
    let path = cli.path().join("audit.pub");
    fs::write(&path, &r.stdout).unwrap();
    path
}

/// `certificate verify FILE --public-key KEY` with `extra` arguments.
fn verify_cert(cli: &Cli, file: &Path, key: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec![
        "certificate",
        "verify",
        file.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cli.run(&args)
}

/// Runs `shred <tenant>` crashing at `point` (a test hook): the tenant stays fenced.
fn crash_shred_at(cli: &Cli, tenant: &str, point: &str) {
    let hook = format!("shred:{point}");
    let r = cli.run_env(
        &["shred", tenant, "--confirm", tenant],
        &[("CUSTOS_CRASH_AT", &hook)],
    );
    assert_eq!(r.code, -1, "{hook} did not abort: {}", r.stderr);
    assert_eq!(descriptor(cli, tenant)["state"], "shredding");
}

/// The aborted runs still hold their leases: wait for them to expire.
fn wait_for_leases() {
    std::thread::sleep(std::time::Duration::from_secs(11));
}

fn shred_json(cli: &Cli, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["shred"];
    all.extend_from_slice(args);
    all.push("--json");
    let r = cli.run(&all);
    (r.code, r.json())
}

/// Finding 1: an envelope of the tenant names a key that `[residency]`
/// forbids calling, so it cannot be tried: it was left out of the shred,
/// whose certificate then said every key was destroyed. It is a candidate
/// now: refused, or left untouched on the operator's word and certified as
/// not destroyed.
#[test]
fn a_key_that_cannot_be_tried_is_never_left_out_of_a_shred() {
    let cli = installation(&["acme"]);
    // An AWS KMS provider exists (a region, no endpoint reachable): only the
    // rule stops the call.
    set_config(
        &cli,
        &format!("{}[aws]\nregion = \"eu-central-1\"\n", config_text(&cli)),
    );
    with_residency(&cli, "key_providers = [\"local\"]\n");
    let keys = cli.store().join("tenants/acme/keys");
    let text = fs::read_to_string(keys.join("1")).unwrap();
    assert!(text.contains("\"local:acme\""), "{text}");
    fs::write(
        keys.join("7"),
        text.replace("\"local:acme\"", &format!("\"{EVIL}\"")),
    )
    .unwrap();

    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 1, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(EVIL) && msg.contains("--skip-unproven-key"),
        "{msg}"
    );
    assert_eq!(v["error"]["kind"], "invalid_policy", "{v}");
    assert_eq!(
        descriptor(&cli, "acme")["state"],
        "active",
        "refused before the fence"
    );
    assert!(certificates(&cli, "acme").is_empty());

    let (code, v) = shred_json(
        &cli,
        &["acme", "--confirm", "acme", "--skip-unproven-key", EVIL],
    );
    assert_eq!(code, 0, "{v}");
    let certs = certificates(&cli, "acme");
    assert_eq!(certs.len(), 1);
    let c = certificate(&certs[0]);
    assert_eq!(c["guarantee"]["kind"], "keys_partly_destroyed", "{c}");
    let keys = c["keys"].as_array().unwrap();
    let evil = keys
        .iter()
        .find(|k| k["reference"] == EVIL)
        .unwrap_or_else(|| panic!("{EVIL} missing from {keys:?}"));
    assert_eq!(evil["outcome"], "not_destroyed", "{evil}");
    assert!(
        evil["note"].as_str().unwrap().contains("[residency]"),
        "{evil}"
    );
    let own = keys
        .iter()
        .find(|k| k["reference"] == "local:acme")
        .unwrap();
    assert_eq!(own["outcome"], "destroyed", "{own}");
    let pk = public_key(&cli);
    let r = verify_cert(&cli, &certs[0], &pk, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

/// Finding 3: a shred that fenced the tenant and then meets a key the rules
/// refuse says what to change; once it is changed, the re-run completes
/// (destroying the key), or, on the operator's word, certifies honestly
/// that the key was not destroyed.
#[test]
fn a_fenced_shred_meeting_a_refused_key_says_what_to_change_and_completes() {
    let cli = installation(&["acme", "beta"]);
    let unrestricted = config_text(&cli);
    crash_shred_at(&cli, "acme", "fence");
    crash_shred_at(&cli, "beta", "fence");
    // The tenants' policies go (offboarded): only the store and the
    // registry name their keys, which the rules now refuse.
    for t in ["acme", "beta"] {
        fs::remove_file(cli.path().join(format!("policies/{t}.toml"))).unwrap();
    }
    with_residency(&cli, "key_providers = [\"pkcs11\"]\n");
    wait_for_leases();

    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "invalid_policy", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in [
        "local:acme",
        "[residency] key_providers",
        "allow it in [residency]",
        "--skip-unproven-key local:acme",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert_eq!(descriptor(&cli, "acme")["state"], "shredding");

    // Fixed by allowing the provider again: the shred resumes and destroys.
    set_config(&cli, &unrestricted);
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    assert_eq!(c["guarantee"]["kind"], "keys_destroyed", "{c}");
    assert_eq!(descriptor(&cli, "acme")["state"], "shredded");

    // Or left untouched on the operator's word: certified as not destroyed.
    with_residency(&cli, "key_providers = [\"pkcs11\"]\n");
    let (code, v) = shred_json(
        &cli,
        &[
            "beta",
            "--confirm",
            "beta",
            "--skip-unproven-key",
            "local:beta",
        ],
    );
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "beta")[0]);
    assert_eq!(c["guarantee"]["kind"], "keys_partly_destroyed", "{c}");
    let k = &c["keys"][0];
    assert_eq!(k["reference"], "local:beta");
    assert_eq!(k["outcome"], "not_destroyed", "{k}");
    assert!(
        c["guarantee"]["statement"]
            .as_str()
            .unwrap()
            .contains("Not destroyed: local:beta"),
        "{c}"
    );
    assert!(
        c["verification"]["envelopes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["outcome"] == "key_not_destroyed"),
        "{c}"
    );
    assert!(cli.path().join("keys/beta.key").exists(), "left untouched");
    assert!(!cli.path().join("keys/acme.key").exists(), "destroyed");
    set_config(&cli, &unrestricted);
    cli.ok(&["audit", "verify"]);
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

/// Finding 2: the times and keys a certificate states come from custos's
/// own records. A store writer who edits a key's outcome gets no
/// certificate; an edited start of destruction is ignored (finding 5): the
/// certificate states what custos recorded.
#[test]
fn a_certificate_states_the_times_and_keys_custos_recorded() {
    let cli = installation(&["acme"]);
    // After the keys are destroyed and recorded, before the deletion is.
    crash_shred_at(&cli, "acme", "delete");
    let progress = |d: &Value| d["shredding"]["progress"].clone();
    let before = progress(&descriptor(&cli, "acme"));
    let began = before["keys_began_at"].clone();
    let keys = before["keys"].clone();
    assert!(began.is_string() && keys.is_array(), "{before}");
    wait_for_leases();

    // Destruction "began" an hour later than it did, and a key's destruction
    // "irreversible" a month later than it was.
    cli.tamper("acme", |d| {
        let later = time(&began) + chrono::Duration::hours(1);
        d["shredding"]["progress"]["keys_began_at"] = later.to_rfc3339().into();
        let k = &mut d["shredding"]["progress"]["keys"][0];
        let later = time(&k["irreversible_at"]) + chrono::Duration::days(30);
        k["irreversible_at"] = later.to_rfc3339().into();
    });
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("shred.keys.end"), "{msg}");
    assert!(certificates(&cli, "acme").is_empty());

    // The keys put back, the start of destruction left edited: the
    // certificate states the time the key step recorded, not the store's.
    cli.tamper("acme", |d| {
        d["shredding"]["progress"]["keys"] = keys.clone();
    });
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    assert_eq!(c["format"], "custos-deletion-certificate/2");
    assert_eq!(time(&c["guarantee"]["destruction_began_at"]), time(&began));
    assert_eq!(c["keys"], keys);
}

/// Finding 5: when destruction began is custos's own clock reading,
/// recorded in `shred.keys.begin` before the descriptor: a time a store
/// writer sets in the descriptor before the key step (as early as the
/// shred's start) is not what the certificate states.
#[test]
fn a_destruction_start_the_store_set_is_never_certified() {
    let cli = installation(&["acme"]);
    // After the scope is recorded, before the key step.
    crash_shred_at(&cli, "acme", "scope");
    wait_for_leases();
    let started = descriptor(&cli, "acme")["shredding"]["started_at"].clone();
    cli.tamper("acme", |d| {
        d["shredding"]["progress"]["keys_began_at"] = started.clone();
    });
    let run_began = chrono::Utc::now();
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    let stated = time(&c["guarantee"]["destruction_began_at"]);
    assert!(
        stated >= run_began,
        "{stated} is before this run ({run_began}): {c}"
    );
    assert_ne!(stated, time(&started));
}

/// Issue 15 follow-up, point 1: the request a certificate states (when it
/// was requested, the reason, the requester) is what custos recorded where
/// the shred began (`shred.fence.begin`), not the store's descriptor. An
/// edited request gets no certificate; put back, the shred certifies it.
#[test]
fn a_certificate_states_the_request_custos_recorded() {
    let cli = installation(&["acme"]);
    crash_shred_at(&cli, "acme", "delete");
    let d = descriptor(&cli, "acme");
    let requested = d["shredding"]["progress"]["requested_at"].clone();
    let reason = d["shredding"]["reason"].clone();
    assert!(requested.is_string() && reason.is_string(), "{d}");
    wait_for_leases();

    cli.tamper("acme", |d| {
        let earlier = time(&requested) - chrono::Duration::days(400);
        d["shredding"]["progress"]["requested_at"] = earlier.to_rfc3339().into();
        d["shredding"]["reason"] = "court order 17/2025".into();
    });
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in [
        "requested at",
        "reason \"court order 17/2025\"",
        "shred.fence.begin",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert!(certificates(&cli, "acme").is_empty());

    cli.tamper("acme", |d| {
        d["shredding"]["progress"]["requested_at"] = requested.clone();
        d["shredding"]["reason"] = reason.clone();
    });
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    assert_eq!(time(&c["requested_at"]), time(&requested));
    assert_eq!(c["reason"], reason);
}

/// Point 1, the skip list: a key the store's descriptor adds to the skip
/// list is left untouched by the keys step (the list only ever spares), but
/// no certificate says the operator asked for it unless an audit record of
/// the shred does (`shred.fence.begin`, or `shred.resumed` of a run given
/// `--skip-unproven-key`).
#[test]
fn a_key_left_untouched_is_one_the_operator_asked_to_leave() {
    let cli = installation(&["beta"]);
    let unrestricted = config_text(&cli);
    crash_shred_at(&cli, "beta", "fence");
    fs::remove_file(cli.path().join("policies/beta.toml")).unwrap();
    with_residency(&cli, "key_providers = [\"pkcs11\"]\n");
    wait_for_leases();
    cli.tamper("beta", |d| {
        d["shredding"]["progress"]["skip_unproven"] = serde_json::json!(["local:beta"]);
    });

    let (code, v) = shred_json(&cli, &["beta", "--confirm", "beta"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in [
        "key local:beta as left untouched",
        "--skip-unproven-key",
        "shred.fence.begin",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert!(certificates(&cli, "beta").is_empty());

    // The operator's word, given to the re-run, is recorded and certified.
    let (code, v) = shred_json(
        &cli,
        &[
            "beta",
            "--confirm",
            "beta",
            "--skip-unproven-key",
            "local:beta",
        ],
    );
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "beta")[0]);
    assert_eq!(c["keys"][0]["reference"], "local:beta", "{c}");
    assert_eq!(c["keys"][0]["outcome"], "not_destroyed", "{c}");
    assert!(
        !c["reason"].as_str().unwrap().contains("not checked"),
        "{c}"
    );
    set_config(&cli, &unrestricted);
    cli.ok(&["audit", "verify"]);
}

/// Finding 4: a store writer fences the tenant with no step records and a
/// request of their choosing (reason, requester, a back-dated start). custos
/// records the operator's own request in a `shred.fence.begin` before any
/// step, and the certificate states that request, checked, never the
/// writer's (and no "not checked" note).
#[test]
fn a_shred_fenced_without_records_certifies_the_operators_own_request() {
    let cli = installation(&["acme"]);
    let forged_start = chrono::Utc::now() - chrono::Duration::days(30);
    cli.tamper("acme", |d| {
        d["state"] = "shredding".into();
        d["shredding"] = serde_json::json!({
            "started_at": forged_start.to_rfc3339(),
            "reason": "court order 17/2025",
            "requested_by": "mallory",
        });
    });
    let (code, v) = shred_json(
        &cli,
        &[
            "acme",
            "--confirm",
            "acme",
            "--reason",
            "contract ended",
            "--requested-by",
            "dpo@example.com",
        ],
    );
    assert_eq!(code, 0, "{v}");
    let file = &certificates(&cli, "acme")[0];
    let c = certificate(file);
    assert_eq!(c["reason"], "contract ended", "{c}");
    assert_eq!(c["requested_by"], "dpo@example.com", "{c}");
    assert!(
        time(&c["started_at"]) > forged_start + chrono::Duration::days(29),
        "{c}"
    );
    let log = fs::read_to_string(cli.path().join("state/audit/log.jsonl")).unwrap();
    let fence: Value = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["event"] == "shred.fence.begin" && r["details"]["certificate_id"] == c["id"])
        .expect("no shred.fence.begin for the certificate");
    assert_eq!(fence["details"]["reason"], "contract ended", "{fence}");
    assert_eq!(
        time(&fence["details"]["started_at"]),
        time(&c["started_at"])
    );
    let d = descriptor(&cli, "acme");
    assert_eq!(d["shredding"]["reason"], "contract ended", "{d}");
    let pk = public_key(&cli);
    let r = verify_cert(&cli, file, &pk, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

/// Finding 4: the start a certificate states is the one custos recorded in
/// `shred.fence.begin`: a descriptor back-dating it gets no certificate.
#[test]
fn a_back_dated_start_is_refused() {
    let cli = installation(&["acme"]);
    crash_shred_at(&cli, "acme", "delete");
    wait_for_leases();
    let started = descriptor(&cli, "acme")["shredding"]["started_at"].clone();
    cli.tamper("acme", |d| {
        let earlier = time(&started) - chrono::Duration::hours(1);
        d["shredding"]["started_at"] = earlier.to_rfc3339().into();
    });
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("it states the shred began at") && msg.contains("shred.fence.begin"),
        "{msg}"
    );
    assert!(certificates(&cli, "acme").is_empty());

    cli.tamper("acme", |d| d["shredding"]["started_at"] = started.clone());
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    assert_eq!(time(&c["started_at"]), time(&started));
}

/// Point 4: an epoch shred with a re-wrap meets a key that cannot be tried
/// (the shredded epoch's envelope names a key `[residency]` forbids): it is
/// refused before anything starts, and on the operator's word it is left
/// untouched and certified `not_destroyed`, as a tenant shred does, instead
/// of failing its verification for good (it used to try the envelope).
#[test]
fn an_epoch_shred_leaves_a_key_that_cannot_be_tried_untouched_on_the_operators_word() {
    let cli = installation(&["acme"]);
    cli.ok(&["rotate", "acme", "--new-epoch"]);
    fs::write(cli.path().join("src/acme/new.txt"), "epoch 2\n").unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["forget", "acme", "--keep-last", "1"]);
    set_config(
        &cli,
        &format!("{}[aws]\nregion = \"eu-central-1\"\n", config_text(&cli)),
    );
    let envelope = cli.store().join("tenants/acme/keys/1");
    let text = fs::read_to_string(&envelope).unwrap();
    assert!(text.contains("\"local:acme\""), "{text}");
    fs::write(
        &envelope,
        text.replace("\"local:acme\"", &format!("\"{EVIL}\"")),
    )
    .unwrap();
    with_residency(&cli, "key_providers = [\"local\"]\n");
    let shred = ["acme", "--epoch", "1", "--confirm", "acme", "--rewrap"];

    let (code, v) = shred_json(&cli, &shred);
    assert_eq!(code, 1, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(EVIL) && msg.contains("--skip-unproven-key"),
        "{msg}"
    );
    assert!(
        descriptor(&cli, "acme")["epoch_shred"].is_null(),
        "refused before it began"
    );

    let mut args = shred.to_vec();
    args.extend(["--skip-unproven-key", EVIL]);
    let (code, v) = shred_json(&cli, &args);
    assert_eq!(code, 0, "{v}");
    let c = certificate(&certificates(&cli, "acme")[0]);
    assert_eq!(c["epoch"], 1, "{c}");
    assert_eq!(c["guarantee"]["kind"], "keys_partly_destroyed", "{c}");
    let keys = c["keys"].as_array().unwrap();
    let outcome = |k: &str| {
        keys.iter()
            .find(|x| x["reference"] == k)
            .unwrap_or_else(|| panic!("{k} missing from {keys:?}"))["outcome"]
            .clone()
    };
    assert_eq!(outcome(EVIL), "not_destroyed");
    assert_eq!(outcome("local:acme"), "destroyed");
    let envelopes = c["verification"]["envelopes"].as_array().unwrap();
    assert!(
        !envelopes.is_empty()
            && envelopes
                .iter()
                .all(|e| e["outcome"] == "key_not_destroyed"),
        "{c}"
    );
    let pk = public_key(&cli);
    let r = verify_cert(&cli, &certificates(&cli, "acme")[0], &pk, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

/// Point 5: a shred fenced on host A has its audit records in A's state
/// directory. Host B, sharing the store (and, here, the key directory, so
/// that only the audit log differs), refuses to resume it before doing
/// anything (its steps' records would be in B's log, and no installation
/// could then certify it): the error says it was begun elsewhere and is
/// certified there. A then finishes and certifies it.
#[test]
fn a_shred_begun_on_another_installation_is_certified_there() {
    let cli = installation(&["acme"]);
    crash_shred_at(&cli, "acme", "delete");
    wait_for_leases();
    let b = cli.path().join("host-b");
    fs::create_dir_all(b.join("policies")).unwrap();
    let toml = b.join("custos.toml");
    fs::write(
        &toml,
        format!(
            "store = \"file://{}\"\nstate_dir = \"{}/state\"\npolicies_dir = \"{}/policies\"\n[local_keys]\ndir = \"{}/keys\"\n",
            cli.store().display(),
            b.display(),
            b.display(),
            cli.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(&toml)
        .args(["shred", "acme", "--confirm", "acme", "--json"])
        .env("CUSTOS_LOG", "error")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("CUSTOS_CRASH_AT")
        .output()
        .unwrap();
    let on_b = common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(on_b.code, 1, "{}\n{}", on_b.stdout, on_b.stderr);
    let v = on_b.json();
    assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in [
        "has no record of how shred",
        "not begun here",
        "certified only there",
        "this run did nothing",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert!(certificates(&cli, "acme").is_empty());
    let d = descriptor(&cli, "acme");
    assert_eq!(d["shredding"]["progress"]["step"], "keys_destroyed", "{d}");
    assert!(
        !b.join("state/audit/log.jsonl").exists() || {
            let log = fs::read_to_string(b.join("state/audit/log.jsonl")).unwrap();
            !log.contains("shred.delete")
        }
    );

    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(descriptor(&cli, "acme")["state"], "shredded");
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/data/certificates")
        .join(name)
}

/// Finding 8: certificates issued as `custos-deletion-certificate/1`
/// (before and after `destruction_began_at` was added to it) still verify
/// offline; a format this verifier does not know is refused as such.
#[test]
fn stored_format_1_certificates_still_verify_offline() {
    let cli = Cli::new();
    let key = data("v1-audit-key.pub");
    for name in ["v1-epoch.json", "v1-tenant-destruction-began-at.json"] {
        let file = data(name);
        let c = certificate(&file);
        assert_eq!(c["format"], "custos-deletion-certificate/1", "{name}");
        let r = verify_cert(&cli, &file, &key, &["--json"]);
        assert_eq!(r.code, 0, "{name}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(r.json()["result"]["valid"], true, "{name}");
    }
    // The same bytes but a future format: refused by name, before the signature.
    let text = fs::read_to_string(data("v1-epoch.json")).unwrap();
    let future = cli.path().join("future.json");
    fs::write(
        &future,
        text.replace(
            "\"custos-deletion-certificate/1\"",
            "\"custos-deletion-certificate/9\"",
        ),
    )
    .unwrap();
    let r = verify_cert(&cli, &future, &key, &["--json"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("not one this verifier knows"), "{msg}");
}

/// Finding 9: `--online` on a certificate whose key the configuration may
/// not ask about says it could not check, why, and exits 3, not 1 ("a key
/// still exists").
#[test]
fn online_verification_tells_could_not_check_from_not_destroyed() {
    let cli = installation(&["acme"]);
    let (code, v) = shred_json(&cli, &["acme", "--confirm", "acme"]);
    assert_eq!(code, 0, "{v}");
    let file = certificates(&cli, "acme")[0].clone();
    let pk = public_key(&cli);
    let verify = |cli: &Cli| verify_cert(cli, &file, &pk, &["--online", "--json"]);
    let r = verify(&cli);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);

    with_residency(&cli, "key_providers = [\"pkcs11\"]\n");
    let r = verify(&cli);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["error"]["kind"], "invalid_policy", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("could not check online") && msg.contains("[residency] key_providers"),
        "{msg}"
    );
    let k = &v["result"]["online"]["keys"][0];
    assert_eq!(k["checked"], false, "{k}");
    assert!(
        v["result"]["online"]["problems"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no key is said to be alive: {v}"
    );
}

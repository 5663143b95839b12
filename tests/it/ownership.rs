//! Issue 12, items 1 and 8, through the `custos` binary: a shred destroys only
//! keys its tenant provably owns, and one key serves one tenant at every entry
//! point. The attacker writes the store (descriptors, envelopes, claims) and
//! nothing else; after every attack the victim (beta) still restores byte for
//! byte, and its key file is intact.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::Cli;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers

/// `Cli::run_env` with JSON log lines on stderr (and the caller's variables).
fn run_env(cli: &Cli, args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let mut envs = vec![("CUSTOS_LOG_FORMAT", "json")];
    envs.extend_from_slice(env);
    cli.run_env(args, &envs)
}

fn run(cli: &Cli, args: &[&str]) -> common::Run {
    run_env(cli, args, &[])
}

fn ok(cli: &Cli, args: &[&str]) -> common::Run {
    let r = run(cli, args);
    assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
    r
}

/// Runs with `--json`, expects a failure of `kind`; returns the message.
fn refused(cli: &Cli, args: &[&str], kind: &str) -> String {
    let mut args = args.to_vec();
    args.push("--json");
    let r = run(cli, &args);
    assert_eq!(
        r.code, 1,
        "custos {args:?} should fail:\n{}\n{}",
        r.stdout, r.stderr
    );
    let v = r.json();
    assert_eq!(v["error"]["kind"], kind, "custos {args:?}: {v}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

/// An installation with a short lease TTL and backed-up tenants.
fn installation(tenants: &[&str]) -> Cli {
    let cli = Cli::new();
    let toml = cli.path().join("custos.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("[daemon]\nlease_ttl = \"10s\"\n");
    fs::write(&toml, text).unwrap();
    for t in tenants {
        let src = source(&cli, t);
        make_data(&src, t);
        cli.policy(t, &src);
        ok(&cli, &["backup", t]);
    }
    cli
}

fn source(cli: &Cli, tenant: &str) -> PathBuf {
    cli.path().join("src").join(tenant)
}

fn make_data(root: &Path, tag: &str) {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("hello.txt"), format!("hello {tag}\n").repeat(500)).unwrap();
    let mut rnd = vec![0u8; 300 << 10];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("random.bin"), &rnd).unwrap();
    for i in 0..3 {
        fs::write(root.join(format!("sub/f{i}")), format!("{tag} {i}\n")).unwrap();
    }
}

fn descriptor(cli: &Cli, tenant: &str) -> Value {
    cli.descriptor(tenant)
}

/// What a store writer does (see [`Cli::tamper`]).
fn tamper(cli: &Cli, tenant: &str, f: impl FnOnce(&mut Value)) {
    cli.tamper(tenant, f)
}

fn key_file(cli: &Cli, name: &str) -> PathBuf {
    cli.path().join("keys").join(format!("{name}.key"))
}

/// Beta is whole: its key file is there and its latest snapshot restores
/// byte for byte.
fn beta_restores(cli: &Cli) {
    assert!(key_file(cli, "beta").exists(), "beta's key was destroyed");
    let target = cli.path().join(format!(
        "restore-{}",
        hex::encode(custos::util::random_bytes::<6>())
    ));
    ok(
        cli,
        &[
            "restore",
            "beta",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    common::assert_same(&source(cli, "beta"), &target.join("data"));
}

/// Audit records of `tenant` with event `event`.
fn audit_events(cli: &Cli, tenant: &str, event: &str) -> Vec<Value> {
    let r = ok(cli, &["audit", "show", "--tenant", tenant, "--json"]);
    r.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

fn certificate_file(cli: &Cli, tenant: &str) -> PathBuf {
    let dir = cli.store().join("certificates").join(tenant);
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

/// Verifies the tenant's certificate offline and online; returns its body.
fn verified_certificate(cli: &Cli, tenant: &str) -> Value {
    let file = certificate_file(cli, tenant);
    let r = ok(
        cli,
        &[
            "certificate",
            "verify",
            file.to_str().unwrap(),
            "--online",
            "--json",
        ],
    );
    // With or without the `{"ok", "result"}` envelope around the report.
    let v = r.json();
    let report = if v.get("result").is_some() {
        &v["result"]
    } else {
        &v
    };
    assert_eq!(report["valid"], true, "{}", r.stdout);
    assert_eq!(report["online"]["ok"], true, "{}", r.stdout);
    serde_json::from_slice::<Value>(&fs::read(&file).unwrap()).unwrap()["certificate"].clone()
}

fn key_outcome(cert: &Value, key: &str) -> String {
    cert["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["reference"] == key)
        .unwrap_or_else(|| panic!("{key} not in {}", cert["keys"]))["outcome"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Creates a local key, as the operator provides a key before `rotate
/// --replace-cmk` (there is no command for it: the local provider stands in
/// for a KMS).
fn create_local_key(cli: &Cli, name: &str) {
    let provider = custos::keys::local::LocalKeyProvider::new(cli.path().join("keys")).unwrap();
    let key = custos::keys::KeyRef::local(name).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(custos::keys::KeyProvider::create_key(&provider, &key))
        .unwrap();
}

/// Moves the tenant to `local:<new>` and points its policy there.
fn replace_key(cli: &Cli, tenant: &str, new: &str) {
    create_local_key(cli, new);
    ok(
        cli,
        &["rotate", tenant, "--replace-cmk", &format!("local:{new}")],
    );
    let policy = cli.path().join(format!("policies/{tenant}.toml"));
    let text = fs::read_to_string(&policy).unwrap();
    let line = regex_free_key_line(&text);
    fs::write(
        &policy,
        text.replace(&line, &format!("key = \"local:{new}\"")),
    )
    .unwrap();
}

fn regex_free_key_line(policy: &str) -> String {
    policy
        .lines()
        .find(|l| l.starts_with("key = "))
        .expect("a key line")
        .to_owned()
}

/// Where a tenant's claim on `key` lies: `keys/claims/<id>`, id = SHA-256 of
/// "custos/v1/key-claim" ‖ 0x00 ‖ key reference (docs/FORMAT.md §3a).
fn claim_path(cli: &Cli, tenant: &str, key: &str) -> PathBuf {
    use sha2::Digest;
    let id = sha2::Sha256::digest(format!("custos/v1/key-claim\0{key}").as_bytes());
    cli.store()
        .join("tenants")
        .join(tenant)
        .join("keys/claims")
        .join(hex::encode(id))
}

// ---------------------------------------------------------------------------
// Item 1: `shred alpha` must never destroy beta's key

/// The attack: beta's key added to alpha's previous keys, beta's
/// descriptor made unreadable (junk), deleted, or marked shredded; on this
/// host (which bound beta) and on one whose key registry is gone.
#[test]
fn shred_refuses_a_key_the_store_adds_to_the_tenant() {
    for (variant, forget_registry) in [
        ("junk", false),
        ("deleted", false),
        ("shredded", false),
        ("junk", true),
        ("shredded", true),
    ] {
        let cli = installation(&["alpha", "beta"]);
        let beta_descriptor = fs::read(cli.descriptor_path("beta")).unwrap();
        tamper(&cli, "alpha", |d| {
            d["previous_keys"] = serde_json::json!(["local:beta"]);
        });
        match variant {
            "junk" => fs::write(cli.descriptor_path("beta"), b"{ not json").unwrap(),
            "deleted" => fs::remove_file(cli.descriptor_path("beta")).unwrap(),
            _ => tamper(&cli, "beta", |d| d["state"] = "shredded".into()),
        }
        if forget_registry {
            fs::remove_file(cli.path().join("state/keys.json")).unwrap();
        }
        let message = refused(
            &cli,
            &["shred", "alpha", "--confirm", "alpha"],
            "key_ownership_unproven",
        );
        assert!(message.contains("local:beta"), "{variant}: {message}");
        // Refused before the fence: nothing changed, and the refusal is audited.
        assert_eq!(descriptor(&cli, "alpha")["state"], "active", "{variant}");
        assert!(key_file(&cli, "alpha").exists(), "{variant}");
        let refusals = audit_events(&cli, "alpha", "shred.refused");
        assert_eq!(refusals.len(), 1, "{variant}");
        assert_eq!(refusals[0]["details"]["key"], "local:beta", "{variant}");
        fs::write(cli.descriptor_path("beta"), &beta_descriptor).unwrap();
        beta_restores(&cli);

        // The operator's explicit word leaves beta's key untouched, and the
        // certificate says so; alpha's own key is destroyed.
        ok(
            &cli,
            &[
                "shred",
                "alpha",
                "--confirm",
                "alpha",
                "--skip-unproven-key",
                "local:beta",
            ],
        );
        let cert = verified_certificate(&cli, "alpha");
        assert_eq!(
            cert["guarantee"]["kind"], "keys_partly_destroyed",
            "{variant}"
        );
        assert!(
            cert["guarantee"]["pending"]
                .as_str()
                .unwrap()
                .contains("local:beta"),
            "{cert}"
        );
        assert_eq!(key_outcome(&cert, "local:beta"), "not_destroyed");
        assert_eq!(key_outcome(&cert, "local:alpha"), "destroyed");
        assert!(!key_file(&cli, "alpha").exists());
        beta_restores(&cli);
    }
}

/// Alpha's current or pending key set to beta's; beta's envelope and claim
/// copied into alpha's prefix as "proof": none of it makes alpha own beta's key.
#[test]
fn shred_refuses_beta_as_current_pending_or_with_copied_proof() {
    let cli = installation(&["alpha", "beta"]);
    let original = fs::read(cli.descriptor_path("alpha")).unwrap();
    let restore_alpha = |cli: &Cli| {
        // Keeps the generation custos last saw, so the original is no replay.
        let seen = descriptor(cli, "alpha")["generation"].clone();
        let mut d: Value = serde_json::from_slice(&original).unwrap();
        d["generation"] = seen;
        fs::write(
            cli.descriptor_path("alpha"),
            serde_json::to_vec(&d).unwrap(),
        )
        .unwrap();
    };

    // Alpha's current key is beta's: its policy (local:alpha) no longer
    // matches, which does not stop a shred (policy drift, issue 13), and
    // with or without a policy the key is unproven.
    tamper(&cli, "alpha", |d| {
        d["key"] = "local:beta".into();
        d["previous_keys"] = serde_json::json!(["local:alpha"]);
    });
    refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_ownership_unproven",
    );
    assert!(key_file(&cli, "beta").exists());
    let policy = cli.path().join("policies/alpha.toml");
    let policy_text = fs::read(&policy).unwrap();
    fs::remove_file(&policy).unwrap();
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_ownership_unproven",
    );
    assert!(
        message.contains("local:beta") && message.contains("current"),
        "{message}"
    );
    fs::write(&policy, &policy_text).unwrap();
    restore_alpha(&cli);

    // A pending move to beta's key: unproven.
    tamper(&cli, "alpha", |d| d["pending_key"] = "local:beta".into());
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_ownership_unproven",
    );
    assert!(
        message.contains("local:beta") && message.contains("pending"),
        "{message}"
    );
    restore_alpha(&cli);

    // Beta's envelope and key claim copied into alpha's prefix: their wrap
    // context names beta, so they prove nothing for alpha.
    let alpha_keys = cli.store().join("tenants/alpha/keys");
    fs::copy(
        cli.store().join("tenants/beta/keys/1"),
        alpha_keys.join("9"),
    )
    .unwrap();
    let beta_claim = claim_path(&cli, "beta", "local:beta");
    assert!(beta_claim.exists(), "beta's init wrote its claim");
    fs::copy(&beta_claim, claim_path(&cli, "alpha", "local:beta")).unwrap();
    tamper(&cli, "alpha", |d| {
        d["previous_keys"] = serde_json::json!(["local:beta"]);
    });
    refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_ownership_unproven",
    );
    assert_eq!(descriptor(&cli, "alpha")["state"], "active");
    beta_restores(&cli);
}

/// Beta's key that alpha's descriptor does not name, but that beta uses
/// while its own descriptor hides it: alpha's legitimately proven key is
/// destroyed only when no other tenant uses it (here: a key shared before
/// one key per tenant was enforced, simulated by beta's descriptor naming
/// alpha's key).
#[test]
fn shred_refuses_a_key_another_tenant_also_uses() {
    let cli = installation(&["alpha", "beta"]);
    tamper(&cli, "beta", |d| {
        d["previous_keys"] = serde_json::json!(["local:alpha"]);
    });
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_in_use",
    );
    assert!(message.contains("tenant beta"), "{message}");
    assert_eq!(descriptor(&cli, "alpha")["state"], "active");
    assert!(key_file(&cli, "alpha").exists());
}

/// A previous key keeps its proof after rotation (its claim); without the
/// claim the registry still proves it; with neither it is refused, and
/// `--skip-unproven-key` leaves it alive with an honest certificate.
#[test]
fn previous_keys_are_proven_by_claim_or_registry_or_left_alone() {
    let cli = installation(&["alpha", "beta", "gamma"]);
    for t in ["alpha", "beta", "gamma"] {
        replace_key(&cli, t, &format!("{t}-2"));
    }
    // alpha: claim intact. beta: claim deleted, registry knows. gamma: neither.
    fs::remove_file(claim_path(&cli, "beta", "local:beta")).unwrap();
    fs::remove_file(claim_path(&cli, "gamma", "local:gamma")).unwrap();
    let registry = cli.path().join("state/keys.json");
    let mut reg: Value = serde_json::from_slice(&fs::read(&registry).unwrap()).unwrap();
    reg["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|b| b["key"] != "local:gamma");
    fs::write(&registry, serde_json::to_vec(&reg).unwrap()).unwrap();

    for t in ["alpha", "beta"] {
        ok(&cli, &["shred", t, "--confirm", t]);
        let cert = verified_certificate(&cli, t);
        assert_eq!(cert["guarantee"]["kind"], "keys_destroyed", "{t}");
        assert_eq!(
            key_outcome(&cert, &format!("local:{t}")),
            "destroyed",
            "{t}"
        );
        assert!(!key_file(&cli, t).exists(), "{t}");
    }
    let message = refused(
        &cli,
        &["shred", "gamma", "--confirm", "gamma"],
        "key_ownership_unproven",
    );
    assert!(
        message.contains("local:gamma") && message.contains("previous"),
        "{message}"
    );
    assert_eq!(descriptor(&cli, "gamma")["state"], "active");
    ok(
        &cli,
        &[
            "shred",
            "gamma",
            "--confirm",
            "gamma",
            "--skip-unproven-key",
            "local:gamma",
        ],
    );
    let cert = verified_certificate(&cli, "gamma");
    assert_eq!(cert["guarantee"]["kind"], "keys_partly_destroyed");
    assert_eq!(key_outcome(&cert, "local:gamma"), "not_destroyed");
    assert_eq!(key_outcome(&cert, "local:gamma-2"), "destroyed");
    assert!(key_file(&cli, "gamma").exists(), "left untouched");
    // A skip list naming a key the tenant does not name is a usage error.
    let cli = installation(&["delta"]);
    refused(
        &cli,
        &[
            "shred",
            "delta",
            "--confirm",
            "delta",
            "--skip-unproven-key",
            "local:nobody",
        ],
        "invalid_argument",
    );
}

/// Killed right after destroying its keys, on a host that then lost its key
/// registry: the re-run cannot prove the destroyed key (its claim no longer
/// unwraps), needs no proof for it (nothing to destroy), and completes.
#[test]
fn a_shred_resumed_after_its_keys_were_destroyed_completes() {
    let cli = installation(&["alpha", "beta"]);
    let r = run_env(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        &[("CUSTOS_CRASH_AT", "shred:keys")],
    );
    assert_eq!(r.code, -1, "the hook aborts: {}", r.stderr);
    assert!(!key_file(&cli, "alpha").exists());
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    // The aborted run still holds its lease until the TTL passes.
    std::thread::sleep(std::time::Duration::from_secs(11));
    ok(&cli, &["shred", "alpha", "--confirm", "alpha"]);
    let cert = verified_certificate(&cli, "alpha");
    assert_eq!(cert["guarantee"]["kind"], "keys_destroyed");
    assert_eq!(key_outcome(&cert, "local:alpha"), "already_destroyed");
    assert_eq!(descriptor(&cli, "alpha")["state"], "shredded");
    beta_restores(&cli);
}

/// Epoch shreds: a re-wrap target another tenant uses is refused, and a
/// target a store writer records for an interrupted shred is not followed.
#[test]
fn epoch_shred_rewrap_targets_must_be_the_tenants_alone() {
    let cli = installation(&["alpha", "beta"]);
    ok(&cli, &["rotate", "alpha", "--new-epoch"]);
    ok(&cli, &["backup", "alpha"]);
    ok(&cli, &["forget", "alpha", "--keep-last", "1", "--prune"]);
    let message = refused(
        &cli,
        &[
            "shred",
            "alpha",
            "--confirm",
            "alpha",
            "--epoch",
            "1",
            "--rewrap-to",
            "local:beta",
        ],
        "key_in_use",
    );
    assert!(message.contains("tenant beta"), "{message}");
    assert!(descriptor(&cli, "alpha")["epoch_shred"].is_null());

    // Interrupted right after it started; the store writer swaps the target.
    let r = run_env(
        &cli,
        &[
            "shred",
            "alpha",
            "--confirm",
            "alpha",
            "--epoch",
            "1",
            "--rewrap",
        ],
        &[("CUSTOS_CRASH_AT", "shred-epoch:fence")],
    );
    assert_eq!(r.code, -1, "{}", r.stderr);
    tamper(&cli, "alpha", |d| {
        d["epoch_shred"]["rewrap_to"] = "local:beta".into();
    });
    std::thread::sleep(std::time::Duration::from_secs(11));
    let message = refused(
        &cli,
        &[
            "shred",
            "alpha",
            "--confirm",
            "alpha",
            "--epoch",
            "1",
            "--rewrap",
        ],
        "invalid_argument",
    );
    assert!(message.contains("local:beta"), "{message}");
    // Named explicitly, it is checked like any new key: refused.
    refused(
        &cli,
        &[
            "shred",
            "alpha",
            "--confirm",
            "alpha",
            "--epoch",
            "1",
            "--rewrap-to",
            "local:beta",
        ],
        "key_in_use",
    );
    assert_eq!(descriptor(&cli, "alpha")["key"], "local:alpha");
    beta_restores(&cli);
}

/// Rotation: a pending move to beta's key that a store writer planted is
/// dropped, never followed; `--replace-cmk` to beta's key is refused.
#[test]
fn rotation_never_moves_a_tenant_to_another_tenants_key() {
    let cli = installation(&["alpha", "beta"]);
    let message = refused(
        &cli,
        &["rotate", "alpha", "--replace-cmk", "local:beta"],
        "key_in_use",
    );
    assert!(message.contains("tenant beta"), "{message}");
    tamper(&cli, "alpha", |d| d["pending_key"] = "local:beta".into());
    ok(&cli, &["rotate", "alpha", "--new-epoch"]);
    let d = descriptor(&cli, "alpha");
    assert!(d["pending_key"].is_null(), "{d}");
    assert_eq!(d["key"], "local:alpha");
    assert_eq!(
        audit_events(&cli, "alpha", "rotate.pending-key-dropped").len(),
        1
    );
    for e in fs::read_dir(cli.store().join("tenants/alpha/keys")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let env: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            assert_eq!(env["key"], "local:alpha", "{}", p.display());
        }
    }
    // A descriptor whose current key is beta's: no rotation acts on it
    // (without a policy to compare with, the key's own proof decides).
    let policy = cli.path().join("policies/alpha.toml");
    let policy_text = fs::read(&policy).unwrap();
    fs::remove_file(&policy).unwrap();
    let before = descriptor(&cli, "alpha");
    tamper(&cli, "alpha", |d| {
        d["key"] = "local:beta".into();
        d["previous_keys"] = serde_json::json!(["local:alpha"]);
    });
    for action in ["--cmk", "--new-epoch"] {
        let message = refused(&cli, &["rotate", "alpha", action], "key_ownership_unproven");
        assert!(message.contains("local:beta"), "{message}");
    }
    for e in fs::read_dir(cli.store().join("tenants/alpha/keys")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let env: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            assert_eq!(env["key"], "local:alpha", "{}", p.display());
        }
    }
    tamper(&cli, "alpha", |d| {
        d["key"] = before["key"].clone();
        d["previous_keys"] = before["previous_keys"].clone();
    });
    fs::write(&policy, &policy_text).unwrap();

    // Scheduling the deletion of the old key, which a re-run takes from the
    // descriptor's last previous key: with beta's key appended there, refused.
    replace_key(&cli, "alpha", "alpha-2");
    tamper(&cli, "alpha", |d| {
        d["previous_keys"] = serde_json::json!(["local:alpha", "local:beta"]);
    });
    let message = refused(
        &cli,
        &[
            "rotate",
            "alpha",
            "--replace-cmk",
            "local:alpha-2",
            "--schedule-old-key-deletion",
            "7",
        ],
        "key_ownership_unproven",
    );
    assert!(message.contains("local:beta"), "{message}");
    assert_eq!(audit_events(&cli, "alpha", "rotate.refused").len(), 1);
    ok(&cli, &["backup", "beta"]);
    beta_restores(&cli);
}

/// The "old" key a re-run of `rotate --replace-cmk
/// --schedule-old-key-deletion` destroys is the descriptor's last previous
/// key: a store writer who appends the tenant's *current* key there (proven
/// alpha's, used by no other tenant) must not make custos destroy the key
/// every live envelope of alpha was just re-wrapped under.
#[test]
fn a_rotation_never_destroys_the_key_the_tenant_lives_under() {
    let cli = installation(&["alpha", "beta"]);
    create_local_key(&cli, "alpha-2");
    let args = [
        "rotate",
        "alpha",
        "--replace-cmk",
        "local:alpha-2",
        "--schedule-old-key-deletion",
        "7",
    ];
    ok(&cli, &args);
    assert!(
        !key_file(&cli, "alpha").exists(),
        "the old key is destroyed"
    );
    tamper(&cli, "alpha", |d| {
        d["previous_keys"] = serde_json::json!(["local:alpha", "local:alpha-2"]);
    });
    let message = refused(&cli, &args, "key_in_use");
    assert!(
        message.contains("tenants/alpha/keys/1") && message.contains("local:alpha-2"),
        "{message}"
    );
    assert!(
        key_file(&cli, "alpha-2").exists(),
        "alpha's current key was destroyed"
    );
    assert_eq!(audit_events(&cli, "alpha", "rotate.refused").len(), 1);
    // Alpha still restores under its current key.
    let policy = cli.path().join("policies/alpha.toml");
    let text = fs::read_to_string(&policy).unwrap();
    let line = regex_free_key_line(&text);
    fs::write(&policy, text.replace(&line, "key = \"local:alpha-2\"")).unwrap();
    let target = cli.path().join("restore-alpha");
    ok(
        &cli,
        &[
            "restore",
            "alpha",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    common::assert_same(&source(&cli, "alpha"), &target.join("data"));
    beta_restores(&cli);
}

// ---------------------------------------------------------------------------
// Item 8: one key, one tenant, at every entry point

#[test]
fn a_key_serves_one_tenant_at_every_entry_point() {
    let cli = installation(&["alpha", "beta"]);
    // tenant init with another tenant's key.
    let message = refused(
        &cli,
        &["tenant", "init", "zeta", "--key", "local:beta"],
        "key_in_use",
    );
    assert!(message.contains("tenant beta"), "{message}");
    assert!(!cli.store().join("tenants/zeta").exists());
    // --allow-reuse is no way around it.
    refused(
        &cli,
        &[
            "tenant",
            "init",
            "zeta",
            "--key",
            "local:beta",
            "--allow-reuse",
        ],
        "key_in_use",
    );
    // A first backup whose policy names another tenant's key.
    let src = source(&cli, "gamma");
    make_data(&src, "gamma");
    fs::write(
        cli.path().join("policies/gamma.toml"),
        format!(
            "tenant = \"gamma\"\nkey = \"local:beta\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n",
            src.display()
        ),
    )
    .unwrap();
    let message = refused(&cli, &["backup", "gamma"], "key_in_use");
    assert!(message.contains("beta"), "{message}");
    assert!(!cli.store().join("tenants/gamma").exists());
    // Hidden from the store's descriptors, the policies and this host's
    // registry, beta's key is still found: its envelope unwraps under it.
    fs::remove_file(cli.path().join("policies/gamma.toml")).unwrap();
    fs::remove_file(cli.path().join("policies/beta.toml")).unwrap();
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    tamper(&cli, "beta", |d| d["state"] = "shredded".into());
    let message = refused(
        &cli,
        &["tenant", "init", "zeta", "--key", "local:beta"],
        "key_in_use",
    );
    assert!(message.contains("tenants/beta/keys/"), "{message}");
    // And a "shredded" beta cannot be re-initialised over its live data.
    let message = refused(
        &cli,
        &[
            "tenant",
            "init",
            "beta",
            "--key",
            "local:beta-new",
            "--allow-reuse",
        ],
        "tenant_unavailable",
    );
    assert!(message.contains("still unwraps"), "{message}");
    tamper(&cli, "beta", |d| d["state"] = "active".into());
    beta_restores(&cli);
    // Its own key is fine for its own tenant (idempotent init).
    ok(&cli, &["tenant", "init", "alpha"]);
}

/// A tenant made before key claims existed: `tenant init` on it records the
/// claim of its current key (proven by its envelope), so a later
/// replacement keeps the old key provable.
#[test]
fn tenants_without_claims_get_them_from_their_envelopes() {
    let cli = installation(&["alpha"]);
    let claim = claim_path(&cli, "alpha", "local:alpha");
    fs::remove_file(&claim).unwrap();
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    ok(&cli, &["tenant", "init", "alpha"]);
    assert!(claim.exists());
    // Rotation records it too, before the envelopes move away.
    fs::remove_file(&claim).unwrap();
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    replace_key(&cli, "alpha", "alpha-2");
    assert!(claim.exists());
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    ok(&cli, &["shred", "alpha", "--confirm", "alpha"]);
    let cert = verified_certificate(&cli, "alpha");
    assert_eq!(cert["guarantee"]["kind"], "keys_destroyed");
    assert_eq!(key_outcome(&cert, "local:alpha"), "destroyed");
}

// ---------------------------------------------------------------------------
// A second look, as an attacker would (review of the ownership change)

/// Removes every object of `tenant` but its descriptor, as a store writer
/// may (deleting is denial of service, not a key decision).
fn delete_objects(cli: &Cli, tenant: &str) {
    for (rel, _) in cli.objects(tenant) {
        if rel != "tenant.json" {
            fs::remove_file(cli.store().join("tenants").join(tenant).join(rel)).unwrap();
        }
    }
}

/// A store writer drops a key from the descriptor: a previous key after a
/// replacement, or (no policy pins it) the current key, replaced by a name
/// nothing knows. The shred still ends the dropped key, found by the key
/// registry of this host or, on a host without it, by the tenant's claim:
/// otherwise it would outlive a certificate saying every key was destroyed
/// and unwrap any old copy of the tenant's envelopes.
#[test]
fn a_shred_ends_keys_the_descriptor_no_longer_names() {
    for (variant, forget_registry) in [
        ("previous", false),
        ("previous", true),
        ("current", false),
        ("current", true),
        ("epoch", false),
    ] {
        let cli = installation(&["alpha", "beta"]);
        match variant {
            "current" => {
                fs::remove_file(cli.path().join("policies/alpha.toml")).unwrap();
                tamper(&cli, "alpha", |d| d["key"] = "local:ghost".into());
            }
            _ => {
                replace_key(&cli, "alpha", "alpha-2");
                tamper(&cli, "alpha", |d| {
                    d["previous_keys"] = serde_json::json!([])
                });
            }
        }
        if forget_registry {
            fs::remove_file(cli.path().join("state/keys.json")).unwrap();
        }
        if variant == "epoch" {
            ok(&cli, &["rotate", "alpha", "--new-epoch"]);
            ok(&cli, &["backup", "alpha"]);
            ok(&cli, &["forget", "alpha", "--keep-last", "1", "--prune"]);
            ok(
                &cli,
                &[
                    "shred",
                    "alpha",
                    "--confirm",
                    "alpha",
                    "--epoch",
                    "1",
                    "--rewrap",
                ],
            );
        } else if variant == "current" {
            // A local key this host does not find is not a destroyed one:
            // refused, until the operator leaves it untouched by name.
            let message = refused(
                &cli,
                &["shred", "alpha", "--confirm", "alpha"],
                "key_unavailable",
            );
            assert!(message.contains("local:ghost"), "{message}");
            ok(
                &cli,
                &[
                    "shred",
                    "alpha",
                    "--confirm",
                    "alpha",
                    "--skip-unproven-key",
                    "local:ghost",
                ],
            );
        } else {
            ok(&cli, &["shred", "alpha", "--confirm", "alpha"]);
        }
        let cert = verified_certificate(&cli, "alpha");
        let guarantee = match variant {
            "current" => "keys_partly_destroyed",
            _ => "keys_destroyed",
        };
        assert_eq!(cert["guarantee"]["kind"], guarantee, "{variant}");
        assert_eq!(
            key_outcome(&cert, "local:alpha"),
            "destroyed",
            "{variant}: {}",
            cert["keys"]
        );
        assert!(!key_file(&cli, "alpha").exists(), "{variant}");
        if variant == "current" {
            assert_eq!(key_outcome(&cert, "local:ghost"), "not_destroyed");
        } else {
            assert_eq!(key_outcome(&cert, "local:alpha-2"), "destroyed");
        }
        beta_restores(&cli);
    }
}

/// A store writer fences alpha with the records of a shred that never ran
/// (copied from gamma's finished one: scope, keys, deletion, verification),
/// so that a re-run skips every step. custos must not sign: alpha's key is
/// alive and its data in the store. Nor once the writer also deletes alpha's
/// objects and drops the scope's audit reference: alpha's key, which the
/// registry binds to it, is not among the keys the records say were ended.
#[test]
fn a_shred_never_certifies_records_the_store_made_up() {
    let cli = installation(&["alpha", "beta", "gamma"]);
    ok(&cli, &["shred", "gamma", "--confirm", "gamma"]);
    let gamma = descriptor(&cli, "gamma");
    let forge = |cli: &Cli, edit: &dyn Fn(&mut Value)| {
        tamper(cli, "alpha", |d| {
            let mut s = gamma["shredding"].clone();
            s["finished_at"] = Value::Null;
            s["certificate_id"] = "20260101T000000Z-00000000000000aa".into();
            s["progress"]["step"] = "verified".into();
            edit(&mut s);
            d["state"] = "shredding".into();
            d["shredding"] = s;
        });
    };
    forge(&cli, &|_| {});
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "shred_verification_failed",
    );
    assert!(
        message.contains("local:alpha") && message.contains("audit record"),
        "{message}"
    );
    assert!(key_file(&cli, "alpha").exists());
    assert!(!cli.store().join("certificates/alpha").exists());

    // The writer deletes alpha's objects itself and hides the scope's record.
    delete_objects(&cli, "alpha");
    forge(&cli, &|s| {
        s["progress"]["scope"]
            .as_object_mut()
            .unwrap()
            .remove("audit_seq");
    });
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "shred_verification_failed",
    );
    assert!(message.contains("key local:alpha"), "{message}");
    assert!(key_file(&cli, "alpha").exists());
    assert!(!cli.store().join("certificates/alpha").exists());
    // Records listing alpha's key as destroyed while it lives: refused too.
    forge(&cli, &|s| {
        let mut k = s["progress"]["keys"][0].clone();
        k["reference"] = "local:alpha".into();
        s["progress"]["keys"] = serde_json::json!([k]);
    });
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "shred_verification_failed",
    );
    assert!(
        message.contains("local:alpha is listed as destroyed"),
        "{message}"
    );
    assert!(key_file(&cli, "alpha").exists());
    beta_restores(&cli);
}

/// Binding a key tries every other tenant's objects under it, not only
/// what their descriptors name: a store writer can make beta's descriptor
/// name another key, and a host whose registry and policies do not know
/// beta (another host sharing the store, a lost state directory) would
/// otherwise give beta's key to zeta, whose data beta's key holder could
/// then decrypt. By `tenant init` and by a first backup.
#[test]
fn a_key_is_bound_only_when_no_tenants_objects_unwrap_under_it() {
    let cli = installation(&["alpha", "beta"]);
    tamper(&cli, "beta", |d| d["key"] = "local:other".into());
    fs::remove_file(cli.path().join("state/keys.json")).unwrap();
    let beta_policy = cli.path().join("policies/beta.toml");
    fs::remove_file(&beta_policy).unwrap();
    let message = refused(
        &cli,
        &["tenant", "init", "zeta", "--key", "local:beta"],
        "key_in_use",
    );
    assert!(message.contains("tenants/beta/keys/"), "{message}");
    assert!(!cli.store().join("tenants/zeta").exists());
    let src = source(&cli, "gamma");
    make_data(&src, "gamma");
    fs::write(
        cli.path().join("policies/gamma.toml"),
        format!(
            "tenant = \"gamma\"\nkey = \"local:beta\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n",
            src.display()
        ),
    )
    .unwrap();
    let message = refused(&cli, &["backup", "gamma"], "key_in_use");
    assert!(message.contains("tenants/beta/keys/"), "{message}");
    assert!(!cli.store().join("tenants/gamma").exists());
    tamper(&cli, "beta", |d| d["key"] = "local:beta".into());
    fs::remove_file(cli.path().join("policies/gamma.toml")).unwrap();
    cli.policy("beta", &source(&cli, "beta"));
    beta_restores(&cli);
}

/// The key registry is evidence a shred destroys keys on: a registry (or its
/// lock) that another local user could write or redirect is refused, as
/// ssh's StrictModes refuses loose files, with the fix in the message.
#[test]
fn the_key_registry_is_refused_when_others_could_write_it() {
    use std::os::unix::fs::PermissionsExt;
    let cli = installation(&["alpha"]);
    let registry = cli.path().join("state/keys.json");
    let lock = cli.path().join("state/keys.lock");
    fs::set_permissions(&registry, fs::Permissions::from_mode(0o666)).unwrap();
    let message = refused(&cli, &["tenant", "init", "alpha"], "insecure_permissions");
    assert!(
        message.contains("keys.json") && message.contains("chmod 600"),
        "{message}"
    );
    refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "insecure_permissions",
    );
    assert!(key_file(&cli, "alpha").exists());
    fs::set_permissions(&registry, fs::Permissions::from_mode(0o600)).unwrap();

    // Symbolic links are not followed: not for the registry, not for the lock
    // (which is created: a link would make custos create its target).
    let elsewhere = cli.path().join("elsewhere.json");
    fs::rename(&registry, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &registry).unwrap();
    let message = refused(&cli, &["tenant", "init", "alpha"], "insecure_permissions");
    assert!(message.contains("symbolic link"), "{message}");
    fs::remove_file(&registry).unwrap();
    fs::rename(&elsewhere, &registry).unwrap();
    let target = cli.path().join("lock-target");
    fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let message = refused(
        &cli,
        &["tenant", "init", "zeta", "--key", "local:zeta"],
        "insecure_permissions",
    );
    assert!(message.contains("keys.lock"), "{message}");
    assert!(!target.exists());
    fs::remove_file(&lock).unwrap();
    ok(&cli, &["tenant", "init", "alpha"]);
}

/// An operator's mistake: a configuration whose `[local_keys] dir` is not
/// the directory the keys were made in. Every key then reads as unknown to
/// its provider, which a shred took as "already gone": it exited 0 with a
/// `keys_destroyed` certificate while the keys lived on elsewhere. A local
/// key custos destroyed leaves a tombstone; one this host bound and never
/// destroyed is not gone, it is not here: refused before anything changes.
#[test]
fn a_shred_does_not_take_a_missing_local_key_for_a_destroyed_one() {
    let cli = installation(&["alpha"]);
    let toml = cli.path().join("custos.toml");
    let good = fs::read_to_string(&toml).unwrap();
    let keys_dir = cli.path().join("keys");
    let wrong = good.replace(
        &format!("dir = \"{}\"", keys_dir.display()),
        &format!("dir = \"{}-elsewhere\"", keys_dir.display()),
    );
    assert_ne!(good, wrong);
    fs::write(&toml, &wrong).unwrap();
    let message = refused(
        &cli,
        &["shred", "alpha", "--confirm", "alpha"],
        "key_unavailable",
    );
    assert!(
        message.contains("local:alpha") && message.contains("[local_keys] dir"),
        "{message}"
    );
    assert_eq!(descriptor(&cli, "alpha")["state"], "active");
    assert!(!cli.store().join("certificates/alpha").exists());
    // With the right directory, the same shred goes through.
    fs::write(&toml, &good).unwrap();
    ok(&cli, &["shred", "alpha", "--confirm", "alpha"]);
    let cert = verified_certificate(&cli, "alpha");
    assert_eq!(key_outcome(&cert, "local:alpha"), "destroyed");
    assert!(!key_file(&cli, "alpha").exists());
}

/// Two hosts share the store (leases let them): alpha was made on host A,
/// with its local key in A's key directory. An operator on host B, whose
/// key directory and registry know nothing of alpha, shreds it: custos must
/// not sign that alpha's key is destroyed ("keys_destroyed, every copy
/// unrecoverable") because B does not find the key file. A destroyed local
/// key leaves its tombstone; a missing one may live on elsewhere, as it
/// does here.
#[test]
fn a_shred_on_another_host_does_not_certify_a_local_key_it_cannot_see() {
    let cli = installation(&["alpha", "beta"]);
    let b = cli.path().join("host-b");
    fs::create_dir_all(b.join("policies")).unwrap();
    let toml = b.join("custos.toml");
    fs::write(
        &toml,
        format!(
            "store = \"file://{0}\"\nstate_dir = \"{1}/state\"\npolicies_dir = \"{1}/policies\"\n[local_keys]\ndir = \"{1}/keys\"\n",
            cli.store().display(),
            b.display()
        ),
    )
    .unwrap();
    let on_b = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(&toml)
            .args(args)
            .env("CUSTOS_LOG", "error")
            .env("CUSTOS_LOG_FORMAT", "json")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("CUSTOS_CRASH_AT")
            .output()
            .unwrap();
        common::Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let r = on_b(&["shred", "alpha", "--confirm", "alpha", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["error"]["kind"], "key_unavailable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("local:alpha"),
        "{v}"
    );
    assert!(key_file(&cli, "alpha").exists());
    assert!(!cli.store().join("certificates/alpha").exists());
    assert_eq!(descriptor(&cli, "alpha")["state"], "active");
    // Left untouched on the operator's word, the certificate says so.
    let r = on_b(&[
        "shred",
        "alpha",
        "--confirm",
        "alpha",
        "--skip-unproven-key",
        "local:alpha",
    ]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let file = certificate_file(&cli, "alpha");
    let cert: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    let cert = &cert["certificate"];
    assert_eq!(cert["guarantee"]["kind"], "keys_partly_destroyed", "{cert}");
    assert_eq!(key_outcome(cert, "local:alpha"), "not_destroyed");
    // B's online check does not take the key it cannot see for a destroyed one.
    let r = on_b(&[
        "certificate",
        "verify",
        file.to_str().unwrap(),
        "--online",
        "--json",
    ]);
    let v = r.json();
    let report = if v.get("result").is_some() {
        &v["result"]
    } else {
        &v
    };
    assert_eq!(report["valid"], true, "{v}");
    beta_restores(&cli);
}

/// After `tenant init --allow-reuse`, a store writer fences the new lineage
/// with the id of the old lineage's certificate (which custos signed, and
/// which lies at `certificates/alpha/<id>.json`). A shred must not report
/// that old certificate as its own: it states another key and scope, so
/// the new lineage's destroyed key would be certified nowhere. Without step
/// records the shred takes a fresh id; with them, it is refused before any
/// step runs (this installation's audit log has no record of how a shred of
/// that id began after its certificate), and a stored certificate is adopted
/// only if it states this shred's scope and keys.
#[test]
fn a_shred_never_adopts_an_earlier_lineages_certificate() {
    for with_progress in [false, true] {
        let cli = installation(&["alpha", "beta"]);
        ok(&cli, &["shred", "alpha", "--confirm", "alpha"]);
        let old_file = certificate_file(&cli, "alpha");
        let old_id = old_file.file_stem().unwrap().to_str().unwrap().to_owned();
        let old = fs::read(&old_file).unwrap();
        ok(
            &cli,
            &[
                "tenant",
                "init",
                "alpha",
                "--key",
                "local:alpha-2",
                "--allow-reuse",
            ],
        );
        let policy = cli.path().join("policies/alpha.toml");
        let text = fs::read_to_string(&policy).unwrap();
        let line = regex_free_key_line(&text);
        fs::write(&policy, text.replace(&line, "key = \"local:alpha-2\"")).unwrap();
        ok(&cli, &["backup", "alpha"]);
        tamper(&cli, "alpha", |d| {
            d["state"] = "shredding".into();
            let mut s = serde_json::json!({
                "started_at": "2026-01-01T00:00:00Z",
                "reason": "forged",
                "requested_by": "store writer",
                "certificate_id": old_id,
            });
            if with_progress {
                s["progress"] = serde_json::json!({
                    "step": "fenced",
                    "requested_at": "2026-01-01T00:00:00Z",
                    "actor": "store writer",
                    "pending_window_days": 7,
                });
            }
            d["shredding"] = s;
        });
        let r = run(&cli, &["shred", "alpha", "--confirm", "alpha", "--json"]);
        // The old certificate is untouched and never reported as this shred's.
        assert_eq!(fs::read(&old_file).unwrap(), old);
        if with_progress {
            // The old lineage's records end with its certificate: this
            // installation has no record of how a shred of this id began,
            // so nothing is run (alpha-2 lives) and nothing is certified.
            assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
            let v = r.json();
            assert_eq!(v["error"]["kind"], "shred_verification_failed", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("not begun here"),
                "{v}"
            );
            assert!(key_file(&cli, "alpha-2").exists());
        } else {
            assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
            let id = r.json()["result"]["certificate_id"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_ne!(id, old_id);
            let file = cli
                .store()
                .join("certificates/alpha")
                .join(format!("{id}.json"));
            let cert: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
            assert_eq!(
                key_outcome(&cert["certificate"], "local:alpha-2"),
                "destroyed"
            );
        }
        beta_restores(&cli);
    }
}

//! Key residency: `[residency]` refuses keys and stores outside its rules
//! (naming the rule), `tenant show` states who holds each key, and a tenant
//! on a provider that needs no network performs no AWS call at all.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{self, Cli};

fn with_residency(cli: &Cli, rules: &str) {
    let toml = cli.path().join("custos.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("[residency]\n");
    text.push_str(rules);
    fs::write(&toml, text).unwrap();
}

fn write_policy(cli: &Cli, tenant: &str, key: &str) {
    let src = cli.path().join("src").join(tenant);
    common::make_tree(&src, 5);
    cli.policy(tenant, &src);
    let path = cli.path().join(format!("policies/{tenant}.toml"));
    let text = fs::read_to_string(&path).unwrap();
    let text = text.replace(
        &format!("key = \"local:{tenant}\""),
        &format!("key = \"{key}\""),
    );
    // A schedule, so that `daemon --once` backs the tenant up (never backed up: due).
    fs::write(&path, format!("{text}[backup]\nschedule = \"0 2 * * *\"\n")).unwrap();
}

#[test]
fn a_rule_refuses_an_aws_kms_tenant_and_names_itself() {
    let cli = Cli::new();
    with_residency(&cli, "key_providers = [\"local\", \"pkcs11\", \"kmip\"]\n");
    write_policy(&cli, "acme", "local:acme");
    write_policy(&cli, "zeta", "aws-kms:alias/custos-zeta");

    let v = cli.run(&["policy", "validate", "--json"]);
    assert_eq!(v.code, 1, "{}{}", v.stdout, v.stderr);
    let errors = v.json()["result"]["errors"].to_string();
    assert!(
        errors.contains("zeta.toml")
            && errors.contains(
                "[residency] key_providers = [\\\"local\\\", \\\"pkcs11\\\", \\\"kmip\\\"]"
            )
            && errors.contains("aws-kms"),
        "{errors}"
    );
    // The tenant inside the rules is still valid.
    let tenants = v.json()["result"]["tenants"].to_string();
    assert!(
        tenants.contains("acme") && !tenants.contains("zeta"),
        "{tenants}"
    );

    // Binding a key outside the rules is refused too, by kind, naming the rule.
    let r = cli.run(&[
        "tenant",
        "init",
        "beta",
        "--key",
        "aws-kms:alias/custos-beta",
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["error"]["kind"], "invalid_policy", "{}", r.stdout);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[residency] key_providers"),
        "{}",
        r.stdout
    );
    assert!(!cli.store().join("tenants/beta/tenant.json").exists());

    // The daemon schedules the tenant inside the rules and refuses the other.
    let d = cli.run_env(&["daemon", "--once"], &[("CUSTOS_LOG", "info")]);
    assert!(
        d.stderr.contains("policy.rejected") && d.stderr.contains("key_providers"),
        "{}",
        d.stderr
    );
    assert!(cli.store().join("tenants/acme/tenant.json").exists());
    assert!(!cli.store().join("tenants/zeta/tenant.json").exists());
}

#[test]
fn a_store_outside_the_rules_is_a_configuration_error() {
    let cli = Cli::new();
    with_residency(
        &cli,
        "stores = [\"s3://backups.hospital.internal/custos\"]\n",
    );
    let r = cli.run(&["snapshots", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("[residency] stores") && msg.contains("custos.toml:"),
        "{msg}"
    );
    // An unknown provider in the rules is named at its line.
    let cli = Cli::new();
    with_residency(&cli, "key_providers = [\"vault\"]\n");
    let r = cli.run(&["snapshots", "acme"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("unknown key provider \"vault\""),
        "{}",
        r.stderr
    );
}

/// A TCP listener that counts connections: every AWS endpoint points at it.
struct Tripwire {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Tripwire {
    fn new() -> Tripwire {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                // Read a little, answer nothing: a call fails, never hangs long.
                if let Ok(mut c) = conn {
                    let _ = c.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                    let mut buf = [0u8; 512];
                    let _ = c.read(&mut buf);
                }
            }
        });
        Tripwire { port, hits }
    }
}

/// Every AWS endpoint pointed at `trip`, with a region and credentials, so
/// that custos builds its AWS KMS provider and would call it.
fn aws_at(trip: &Tripwire) -> Vec<(&'static str, String)> {
    let url = format!("http://127.0.0.1:{}", trip.port);
    [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL_STS",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    ]
    .into_iter()
    .map(|v| (v, url.clone()))
    .chain([
        ("AWS_REGION", "eu-central-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ])
    .collect()
}

/// The store operator rewrites a local tenant's descriptor and envelope to
/// name an AWS KMS key: every command that would use it is refused by
/// `[residency]` (`invalid_policy`, naming the rule, audited) before any AWS
/// call. Binding checks alone never see such a key.
#[test]
fn a_key_the_store_names_outside_residency_is_never_called() {
    let trip = Tripwire::new();
    let env = aws_at(&trip);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cli = Cli::new();
    with_residency(&cli, "key_providers = [\"local\"]\n");
    write_policy(&cli, "acme", "local:acme");
    let r = cli.run_env(&["backup", "acme"], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);

    let evil =
        "aws-kms:arn:aws:kms:eu-central-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666";
    let tenant_dir = cli.store().join("tenants/acme");
    for file in [tenant_dir.join("tenant.json"), tenant_dir.join("keys/1")] {
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.contains("\"local:acme\""), "{text}");
        fs::write(
            &file,
            text.replace("\"local:acme\"", &format!("\"{evil}\"")),
        )
        .unwrap();
    }
    // A tenant without a policy (offboarded, or known to this host only
    // from the store): nothing but the store names its key.
    fs::remove_file(cli.path().join("policies/acme.toml")).unwrap();
    let target = cli.path().join("restored");
    let mut refused = 0;
    for args in [
        vec![
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
        vec!["check", "acme", "--read-data"],
        vec!["backup", "acme"],
        vec!["tenant", "show", "acme"],
        vec!["rotate", "acme", "--cmk"],
        vec!["shred", "acme", "--confirm", "acme"],
    ] {
        let mut all = args.clone();
        all.push("--json");
        let r = cli.run_env(&all, &env);
        eprintln!("[residency] {args:?}: exit {} {}", r.code, r.stdout.trim());
        if r.code == 0 {
            continue;
        }
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap();
        if msg.starts_with("refusing to") && msg.contains("[residency] key_providers") {
            assert_eq!(v["error"]["kind"], "invalid_policy", "{args:?}: {v}");
            assert!(msg.contains(evil), "{args:?}: {msg}");
            refused += 1;
        }
    }
    // Restore and check unwrap the envelope: the rule refuses that unwrap
    // (without it, both called AWS KMS). The others fail earlier, or on the
    // rule within another refusal (shred, rotate: ownership unproven).
    assert!(
        refused >= 2,
        "restore and check were not refused by the rule"
    );
    assert_eq!(
        trip.hits.load(Ordering::SeqCst),
        0,
        "custos called AWS for a key the store named, outside [residency]"
    );
    // Each refusal is in the audit log.
    let log: String = common::files_under(&cli.store().join("audit/log"))
        .into_iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        log.contains("\"key.refused\"") && log.contains("key_providers"),
        "no key.refused record in the audit log"
    );
    let r = cli.run_env(&["audit", "verify"], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

#[test]
fn a_local_tenant_makes_no_aws_call_in_the_whole_flow() {
    let trip = Tripwire::new();
    let url = format!("http://127.0.0.1:{}", trip.port);
    // A region makes custos build its AWS KMS provider: still no call may go out.
    let env = [
        ("AWS_REGION", "eu-central-1"),
        ("AWS_ENDPOINT_URL", url.as_str()),
        ("AWS_ENDPOINT_URL_KMS", url.as_str()),
        ("AWS_ENDPOINT_URL_S3", url.as_str()),
        ("AWS_ENDPOINT_URL_STS", url.as_str()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", url.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let cli = Cli::new();
    with_residency(&cli, "key_providers = [\"local\"]\n");
    write_policy(&cli, "acme", "local:acme");
    let ok = |args: &[&str]| {
        let r = cli.run_env(args, &env);
        assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
        r
    };
    ok(&["backup", "acme"]);
    let snap = ok(&["snapshots", "acme", "--json"]).json()["result"]["snapshots"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = cli.path().join("restored");
    ok(&[
        "restore",
        "acme",
        &snap,
        "--target",
        target.to_str().unwrap(),
    ]);
    common::assert_same(&cli.path().join("src/acme"), &target.join("data"));
    ok(&["check", "acme", "--read-data"]);
    ok(&["rotate", "acme", "--cmk"]);
    ok(&["rotate", "acme", "--new-epoch"]);
    ok(&["backup", "acme"]);
    ok(&["forget", "acme", "--keep-last", "1"]);
    ok(&["prune", "acme"]);

    let show = ok(&["tenant", "show", "acme", "--json"]).json();
    let custody = &show["result"]["custody"][0];
    assert_eq!(custody["key"], "local:acme", "{show}");
    assert_eq!(custody["custody"]["provider"], "local");
    assert_eq!(custody["custody"]["network"], false);
    assert_eq!(custody["state"], "enabled");
    assert_eq!(custody["residency"], "allowed");

    let cert = cli.path().join("cert.json");
    ok(&[
        "shred",
        "acme",
        "--confirm",
        "acme",
        "--out",
        cert.to_str().unwrap(),
    ]);
    let public = ok(&["audit", "public-key"]).stdout;
    let pubfile = cli.path().join("audit.pub");
    fs::write(&pubfile, public).unwrap();
    ok(&[
        "certificate",
        "verify",
        cert.to_str().unwrap(),
        "--public-key",
        pubfile.to_str().unwrap(),
    ]);
    ok(&["certificate", "verify", cert.to_str().unwrap(), "--online"]);
    let c: serde_json::Value = serde_json::from_slice(&fs::read(&cert).unwrap()).unwrap();
    let text = c.to_string();
    assert!(
        text.contains("\"custody\"") && text.contains("local key directory"),
        "{text}"
    );

    assert_eq!(
        trip.hits.load(Ordering::SeqCst),
        0,
        "custos connected to the AWS endpoint for a tenant on local keys"
    );
    // The tripwire works: with no rule in the way, a tenant on AWS KMS
    // does connect to it (and fails: it answers nothing).
    let aws = Cli::new();
    let r = aws.run_env(
        &["tenant", "init", "other", "--key", "aws-kms:alias/x"],
        &env,
    );
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        trip.hits.load(Ordering::SeqCst) > 0,
        "the tripwire saw no connection: {}",
        r.stderr
    );
}

/// The events in this installation's local audit log, in order.
fn audit_events(cli: &Cli) -> Vec<String> {
    let log = cli.path().join("state/audit/log.jsonl");
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Read-only surveys (`tenant list`, `tenant show`'s custody, `policy
/// validate`, a report's custody table) ask about keys the rules refuse
/// without writing to the audit log; `tenant show` records only its access
/// to the snapshots it decrypts.
#[test]
fn read_only_surveys_write_no_audit_record() {
    let cli = Cli::new();
    write_policy(&cli, "acme", "local:acme");
    cli.ok(&["backup", "acme"]);
    fs::remove_file(cli.path().join("policies/acme.toml")).unwrap();
    with_residency(&cli, "key_providers = [\"pkcs11\"]\n");
    let before = audit_events(&cli);
    assert!(!before.is_empty());
    for args in [
        vec!["tenant", "list", "--json"],
        vec!["policy", "validate", "--json"],
        vec!["report", "--format", "json"],
    ] {
        let r = cli.run(&args);
        assert!(
            r.code == 0 || r.code == 1,
            "{args:?}: {}\n{}",
            r.stdout,
            r.stderr
        );
        assert_eq!(
            audit_events(&cli),
            before,
            "{args:?} wrote to the audit log"
        );
    }
    let r = cli.run(&["tenant", "show", "acme", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let custody = r.json()["result"]["custody"].to_string();
    assert!(custody.contains("[residency] key_providers"), "{custody}");
    let after = audit_events(&cli);
    let new: Vec<&String> = after[before.len()..]
        .iter()
        .filter(|e| !e.starts_with("tenant.show"))
        .collect();
    // The snapshot listing's refused unwrap is a refused use, recorded; the
    // custody table's questions are not.
    assert!(
        new.iter().all(|e| *e == "key.refused") && new.len() <= 1,
        "{new:?}"
    );
}

/// The AWS SDK calls the client's region whatever region a key ARN names:
/// an ARN of an allowed region, reached through a client of another region,
/// is refused by name (the request would have gone to the other region).
#[test]
fn a_kms_arn_of_another_region_than_the_client_is_refused() {
    let cli = Cli::new();
    let toml = cli.path().join("custos.toml");
    let text = fs::read_to_string(&toml).unwrap();
    fs::write(&toml, format!("{text}[aws]\nregion = \"us-east-1\"\n")).unwrap();
    with_residency(&cli, "kms_regions = [\"eu-central-1\"]\n");
    let arn =
        "aws-kms:arn:aws:kms:eu-central-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666";
    write_policy(&cli, "acme", arn);
    let v = cli.run(&["policy", "validate", "--json"]);
    assert_eq!(v.code, 1, "{}{}", v.stdout, v.stderr);
    let errors = v.json()["result"]["errors"].to_string();
    assert!(
        errors.contains("kms_regions")
            && errors.contains("its ARN names region \\\"eu-central-1\\\"")
            && errors.contains("calls region \\\"us-east-1\\\""),
        "{errors}"
    );
}

//! Store faults (src/store/faults.rs, switched on per run with
//! `CUSTOS_FAULTS`): latency, timeouts, 5xx errors, short reads, lost put
//! responses. Under a moderate rate every job succeeds (bounded retries with
//! backoff); under a high rate jobs fail cleanly; in every case
//! `check --read-data` on the fault-free store passes afterwards: nothing
//! is referenced that was not fully written.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common;

use std::fs;

use crate::common::{Cli, Run};

fn setup() -> (Cli, std::path::PathBuf) {
    let cli = Cli::new();
    // A lease a failed job could not release (every retry failed too) runs
    // out quickly; clean runs wait for it (see `clean`).
    let cfg = cli.path().join("custos.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str("[daemon]\nlease_ttl = \"1s\"\n");
    fs::write(&cfg, text).unwrap();
    let data = cli.path().join("data");
    common::make_tree(&data, 30);
    cli.policy("acme", &data);
    (cli, data)
}

fn faulty(cli: &Cli, spec: &str, args: &[&str]) -> Run {
    cli.run_env(args, &[("CUSTOS_FAULTS", spec)])
}

/// A fault-free run, once a lease left by a failed run has expired.
fn clean(cli: &Cli, args: &[&str]) -> Run {
    for _ in 0..20 {
        let r = cli.run(args);
        if r.code != 0 && r.stderr.contains("is busy") {
            std::thread::sleep(std::time::Duration::from_millis(250));
            continue;
        }
        return r;
    }
    panic!("the tenant stayed busy")
}

fn clean_check(cli: &Cli, after: &str) {
    let r = clean(cli, &["check", "acme", "--read-data", "--json"]);
    assert_eq!(
        r.code, 0,
        "fault-free check after {after}:\n{}\n{}",
        r.stdout, r.stderr
    );
    assert_eq!(r.json()["result"]["faults"], serde_json::json!([]));
}

#[test]
fn every_job_succeeds_under_a_moderate_fault_rate() {
    let (cli, data) = setup();
    for seed in 1..=3 {
        // About 10% of operations fail (errors, timeouts, short reads), a
        // fifth are slowed down.
        let spec = format!("seed={seed},rate=0.1,timeout_after=50ms,latency=0.2,latency_max=20ms");
        fs::write(data.join(format!("new-{seed}")), format!("round {seed}")).unwrap();
        let mut rnd = vec![0u8; 2 << 20];
        custos::util::fill_random(&mut rnd);
        fs::write(data.join(format!("big-{seed}")), &rnd).unwrap();
        for args in [
            vec!["backup", "acme"],
            vec!["check", "acme", "--read-data"],
            vec!["snapshots", "acme"],
        ] {
            let r = faulty(&cli, &spec, &args);
            assert_eq!(
                r.code, 0,
                "{args:?} under {spec}:\n{}\n{}",
                r.stdout, r.stderr
            );
        }
        let target = cli.path().join(format!("restore-{seed}"));
        let r = faulty(
            &cli,
            &spec,
            &[
                "restore",
                "acme",
                "latest",
                "--target",
                target.to_str().unwrap(),
            ],
        );
        assert_eq!(r.code, 0, "restore under {spec}:\n{}", r.stderr);
        common::assert_same(&data, &target.join("data"));
        for args in [
            vec!["forget", "acme", "--keep-last", "1"],
            vec!["prune", "acme"],
        ] {
            let r = faulty(&cli, &spec, &args);
            assert_eq!(
                r.code, 0,
                "{args:?} under {spec}:\n{}\n{}",
                r.stdout, r.stderr
            );
        }
        clean_check(&cli, &spec);
    }
    assert_eq!(cli.run(&["audit", "verify"]).code, 0);
}

#[test]
fn jobs_fail_cleanly_under_a_high_fault_rate() {
    let (cli, data) = setup();
    cli.ok(&["backup", "acme"]);
    let before = cli.objects("acme");
    let high = "seed=9,error=0.7,timeout=0.1,timeout_after=20ms";
    fs::write(data.join("more"), "more data").unwrap();
    let r = faulty(&cli, high, &["backup", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], "store_error", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("injected fault"),
        "the error says what failed: {e}"
    );
    // No new snapshot: the failed run committed nothing.
    let snaps = |objs: &std::collections::BTreeMap<String, Vec<u8>>| {
        objs.keys().filter(|k| k.starts_with("snapshots/")).count()
    };
    assert_eq!(snaps(&cli.objects("acme")), snaps(&before));
    clean_check(&cli, "a failed backup");
    // Reads fail cleanly too, and leave nothing behind.
    let target = cli.path().join("r");
    let r = faulty(
        &cli,
        high,
        &[
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["error"]["kind"], "store_error");
    let r = faulty(&cli, high, &["check", "acme", "--read-data", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["error"]["kind"], "store_error", "{}", r.stdout);
    let r = faulty(&cli, high, &["prune", "acme", "--json"]);
    assert_eq!(r.code, 1);
    clean_check(&cli, "failed restore, check and prune");
    // Without faults everything works again and prune tidies up.
    assert_eq!(clean(&cli, &["backup", "acme"]).code, 0);
    assert_eq!(clean(&cli, &["prune", "acme"]).code, 0);
    let r = cli.ok(&["check", "acme", "--read-data", "--json"]);
    assert_eq!(r.json()["result"]["unreferenced_packs"], 0);
}

#[test]
fn short_reads_are_retried_not_reported_as_corruption() {
    let (cli, _) = setup();
    cli.ok(&["backup", "acme"]);
    // Half of all reads come back short, without an error.
    let r = faulty(
        &cli,
        "seed=4,short_read=0.5,ops=get",
        &["check", "acme", "--read-data", "--json"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["result"]["faults"], serde_json::json!([]));
}

/// Regression: prune recorded the old index files as removed *before*
/// deleting them; killed in between, every later check reported a rollback
/// and every later prune refused to run. Now the removal is two-phase.
#[test]
fn prune_interrupted_while_deleting_old_index_files() {
    let (cli, data) = setup();
    cli.ok(&["backup", "acme"]);
    fs::write(data.join("second"), "2").unwrap();
    cli.ok(&["backup", "acme"]);
    // Every delete of an index file fails: prune stops after writing the
    // consolidated index and recording the removal as begun.
    let r = faulty(&cli, "error=1,ops=delete,paths=/index/", &["prune", "acme"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        cli.object_paths("acme", "index").len(),
        3,
        "old and new index files"
    );
    clean_check(&cli, "an interrupted prune");
    assert_eq!(clean(&cli, &["prune", "acme"]).code, 0);
    assert_eq!(cli.object_paths("acme", "index").len(), 1);
    clean_check(&cli, "the prune that finished it");
}

/// Regression: forget recorded snapshots as forgotten before deleting them;
/// interrupted in between, check reported the survivors as replayed.
#[test]
fn forget_interrupted_while_deleting_snapshots() {
    let (cli, data) = setup();
    for i in 0..3 {
        fs::write(data.join("n"), format!("{i}")).unwrap();
        cli.ok(&["backup", "acme"]);
    }
    let r = faulty(
        &cli,
        "error=1,ops=delete,paths=/snapshots/",
        &["forget", "acme", "--keep-last", "1"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(cli.object_paths("acme", "snapshots").len(), 3);
    clean_check(&cli, "an interrupted forget");
    // The survivors are no longer listed, and prune finishes their removal.
    let listed = clean(&cli, &["snapshots", "acme", "--json"]).stdout;
    assert_eq!(listed.matches("\"id\"").count(), 1, "{listed}");
    cli.ok(&["prune", "acme"]);
    assert_eq!(cli.object_paths("acme", "snapshots").len(), 1);
    clean_check(&cli, "the prune that finished it");
}

//! Restore drills: a healthy tenant passes; each way a backup can fail to
//! restore fails the drill with its reason kind and a non-zero exit, and the
//! exit status, the `drill.finished` event, the JSON output and the stored job
//! report agree. Library tests use the embedded setup; CLI tests run the
//! `custos` binary on a temporary custos.toml and policies directory.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use custos::TenantId;
use custos::context::Context;
use custos::jobs::drill::{
    self, DrillOptions, DrillOutcome, DrillReason, DrillReport, Scope, SnapshotPick,
};
use custos::jobs::runner::{JobSpec, run_job};
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::repo::Repo;
use custos::report::{JobKind, Outcome};
use futures::FutureExt;
use serde_json::Value;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn make_data(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("hello.txt"), "hello world\n".repeat(1000)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let mut rnd = vec![0u8; 3 << 20];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("random.bin"), &rnd).unwrap();
    for i in 0..40 {
        fs::write(root.join(format!("sub/small-{i}")), format!("file {i}\n")).unwrap();
    }
    fs::write(root.join("sub/deeper/zeros"), vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    // A read-only directory: the drill must still clean its scratch up.
    fs::set_permissions(root.join("sub/deeper"), fs::Permissions::from_mode(0o555)).unwrap();
}

// ---------------------------------------------------------------------------
// Library level

struct Lib {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ctx: Context,
    tenant: TenantId,
    key: KeyRef,
}

async fn lib_with_backup() -> Lib {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    make_data(&root.join("data"));
    let ctx = Context::embedded(&root.join("custos")).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &key, false).await.unwrap();
    common::backup_dir(&ctx, &repo, &root.join("data")).await;
    Lib {
        _tmp: tmp,
        root,
        ctx,
        tenant,
        key,
    }
}

fn options(lib: &Lib) -> DrillOptions {
    let mut o = DrillOptions::from_policy(&custos::config::DrillPolicy::default());
    o.scratch = Some(lib.root.join("scratch"));
    o
}

async fn drill_job(lib: &Lib, opts: &DrillOptions) -> jobs::runner::JobRun<DrillReport> {
    let spec = JobSpec {
        tenant: &lib.tenant,
        job: JobKind::Drill,
        policy_key: Some(&lib.key),
        init_with: None,
    };
    run_job(&lib.ctx, spec, |repo, lease, _| {
        drill::run(repo, lease, opts, &NoProgress).boxed()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_drill_passes_then_fails_with_a_full_report() {
    let lib = lib_with_backup().await;
    let mut opts = options(&lib);
    opts.rto = Some(Duration::from_secs(600));
    let run = drill_job(&lib, &opts).await;
    let r = run.result.unwrap();
    assert_eq!(r.outcome, DrillOutcome::Passed, "{r:?}");
    assert_eq!(r.files, 44);
    assert_eq!(r.files_verified, 44);
    assert_eq!(r.bytes, (3 << 20) + 12_000 + (1 << 20) + 310);
    assert_eq!(r.symlinks, 1);
    assert!(r.restore_seconds.unwrap() > 0.0);
    assert_eq!(r.rto_seconds, Some(600.0));
    assert_eq!(r.rto_met, Some(true));
    let scratch = r.scratch.as_ref().unwrap();
    assert!(scratch.removed && !scratch.dir.as_ref().unwrap().exists());
    assert_eq!(run.report.outcome, Outcome::Success);
    let g = &run.report.metrics.gauges;
    assert_eq!(g["passed"], 1.0);
    assert_eq!(g["rto_seconds"], 600.0);
    assert_eq!(g["restore_seconds"], r.restore_seconds.unwrap());

    // A failed drill still yields a report with its reason and details.
    opts.rto = Some(Duration::from_nanos(1));
    let run = drill_job(&lib, &opts).await;
    let r = run.result.unwrap();
    assert_eq!(r.outcome, DrillOutcome::Failed);
    assert_eq!(r.reason, Some(DrillReason::RtoExceeded));
    assert_eq!(r.rto_met, Some(false));
    assert_eq!(run.report.outcome, Outcome::Failure);
    assert_eq!(run.report.error_kind, Some("rto_exceeded"));
    assert_eq!(run.report.metrics.gauges["passed"], 0.0);
    assert!(run.report.metrics.gauges.contains_key("restore_seconds"));
    assert_eq!(run.report.result["reason"], "rto_exceeded");
    assert_eq!(
        run.report.result["snapshot"].as_str(),
        r.snapshot.map(|s| s.to_hex()).as_deref()
    );
    assert_eq!(run.report.result["files"], 44);

    // A run stopped before the drill began is a failed drill as well.
    let other = TenantId::new("never-backed-up").unwrap();
    let spec = JobSpec {
        tenant: &other,
        job: JobKind::Drill,
        policy_key: None,
        init_with: None,
    };
    let run = run_job(&lib.ctx, spec, |repo, lease, _| {
        drill::run(repo, lease, &opts, &NoProgress).boxed()
    })
    .await;
    assert_eq!(run.result.unwrap_err().kind(), "tenant_not_found");
    assert_eq!(run.report.error_kind, Some("no_snapshot"));
    assert_eq!(run.report.result["reason"], "no_snapshot");
    assert_eq!(run.report.result["error_kind"], "tenant_not_found");

    // History: newest first, every drill kept.
    let history = lib
        .ctx
        .state
        .read_reports(&lib.tenant, Some(JobKind::Drill))
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["result"]["reason"], "rto_exceeded");
    assert_eq!(history[1]["result"]["outcome"], "passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_reasons_space_key_and_disk_mismatch() {
    let lib = lib_with_backup().await;

    // Insufficient space, with the free-space reading injected.
    let mut opts = options(&lib);
    opts.available_bytes_override = Some(1 << 20);
    let r = drill_job(&lib, &opts).await.result.unwrap();
    assert_eq!(r.reason, Some(DrillReason::InsufficientSpace), "{r:?}");
    let s = r.scratch.unwrap();
    assert_eq!(s.available_bytes, Some(1 << 20));
    assert!(s.required_bytes.unwrap() > (4 << 20));
    assert_eq!(s.dir, None, "nothing is restored when it cannot fit");

    // The restored files are checked on disk: a changed byte is caught.
    let mut opts = options(&lib);
    opts.keep = true;
    let r = drill_job(&lib, &opts).await.result.unwrap();
    assert_eq!(r.outcome, DrillOutcome::Passed);
    let dir = r.scratch.unwrap().dir.unwrap();
    let repo = Repo::open(&lib.ctx, &lib.tenant, Some(&lib.key))
        .await
        .unwrap();
    let snap = repo.find_snapshot("latest").await.unwrap();
    let index = repo.load_index_strict().await.unwrap();
    let keys = repo.epoch_keys(snap.epoch).await.unwrap();
    let ok = drill::verify_restored(&repo, &index, keys.clone(), &snap, &dir, None)
        .await
        .unwrap();
    assert_eq!(ok.files, 44);
    let victim = dir.join("data/random.bin");
    let mut bytes = fs::read(&victim).unwrap();
    bytes[2_000_000] ^= 1;
    fs::write(&victim, &bytes).unwrap();
    let e = drill::verify_restored(&repo, &index, keys.clone(), &snap, &dir, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "corrupt_object");
    assert!(e.to_string().contains("data/random.bin"), "{e}");
    assert!(e.to_string().contains("do not hash"), "{e}");
    fs::write(dir.join("data/hello.txt"), b"short").unwrap();
    let e = drill::verify_restored(&repo, &index, keys, &snap, &dir, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the manifest says 12000"), "{e}");
    drop(repo);

    // A disabled key: key_unavailable.
    lib.ctx
        .keys
        .local
        .as_ref()
        .unwrap()
        .disable(&lib.key)
        .await
        .unwrap();
    let r = drill_job(&lib, &options(&lib)).await.result.unwrap();
    assert_eq!(r.reason, Some(DrillReason::KeyUnavailable), "{r:?}");
    assert_eq!(r.error_kind.map(|k| k.as_str()), Some("key_unavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_sample_is_seeded_and_always_has_the_verify_files() {
    let lib = lib_with_backup().await;
    let policy = custos::config::load_policy_file(
        &write_policies(
            &lib.root,
            "[drill]\nverify_command = [\"test\", \"-s\", \"{file:data/hello.txt}\"]\n",
        ),
        Path::new("acme.toml"),
    )
    .unwrap();
    let mut opts = DrillOptions::from_policy(&policy.drill);
    opts.scratch = Some(lib.root.join("scratch"));
    opts.scope = Scope::Sample { files: 5 };
    opts.seed = Some(1234);
    opts.keep = true;
    let mut restored = Vec::new();
    for _ in 0..2 {
        let r = drill_job(&lib, &opts).await.result.unwrap();
        assert_eq!(r.outcome, DrillOutcome::Passed, "{r:?}");
        assert_eq!(r.seed, 1234);
        assert_eq!(r.mode, "sample");
        let s = r.sample.clone().unwrap();
        assert_eq!((s.requested, s.files, s.population), (5, 6, 44));
        assert_eq!(s.always, ["data/hello.txt"]);
        assert_eq!(r.files, 6);
        assert_eq!(r.files_verified, 6);
        assert!(r.verify_command.unwrap().passed);
        let dir = r.scratch.unwrap().dir.unwrap();
        assert!(dir.join("data/hello.txt").is_file());
        assert!(!dir.join("link").exists(), "sampled drills skip symlinks");
        restored.push(list_files(&dir));
    }
    assert_eq!(restored[0], restored[1], "same seed, same sample");
    opts.seed = Some(99);
    opts.pick = SnapshotPick::Random {
        within: Duration::from_secs(3600),
    };
    let r = drill_job(&lib, &opts).await.result.unwrap();
    assert_eq!(r.outcome, DrillOutcome::Passed);
    assert_eq!(r.pick, "random within 1h");
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Writes `<root>/policies/acme.toml` (a path source over `<root>/data`) plus `extra`.
fn write_policies(root: &Path, extra: &str) -> PathBuf {
    let dir = root.join("policies");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("acme.toml"),
        format!(
            "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"../data\"\nname = \"data\"\n{extra}"
        ),
    )
    .unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Through the CLI binary

struct Cli {
    tmp: tempfile::TempDir,
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: stdout {}\nstderr {}", self.stdout, self.stderr))
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == name)
            .collect()
    }
}

impl Cli {
    /// A temp directory with custos.toml, policies/acme.toml (`drill` is
    /// appended to it) and data/.
    fn new(drill: &str) -> Cli {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("custos.toml"),
            "policies_dir = \"policies\"\n",
        )
        .unwrap();
        make_data(&tmp.path().join("data"));
        write_policies(tmp.path(), &format!("[drill]\n{drill}\n"));
        Cli { tmp }
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn run(&self, args: &[&str]) -> Ran {
        let out = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(args)
            .current_dir(self.path())
            .env_remove("CUSTOS_CONFIG")
            .env("CUSTOS_LOG_FORMAT", "json")
            .env("TMPDIR", self.path().join("tmp"))
            .output()
            .unwrap();
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn backup(&self, tenant: &str) {
        let r = self.run(&["backup", tenant]);
        assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
    }

    /// Runs a drill with --json and checks that the exit status, the JSON
    /// document, the drill.finished event and the stored job report agree.
    fn drill(&self, args: &[&str]) -> (i32, Value) {
        fs::create_dir_all(self.path().join("tmp")).unwrap();
        let mut all = vec!["drill", "--json"];
        all.extend_from_slice(args);
        let ran = self.run(&all);
        let doc = ran.json();
        let result = doc["result"].clone();
        let passed = result["outcome"] == "passed";
        assert_eq!(doc["ok"], passed);
        assert_eq!(ran.code, if passed { 0 } else { 1 }, "{}", ran.stderr);
        let events = ran.events("drill.finished");
        assert_eq!(events.len(), 1, "one drill.finished: {}", ran.stderr);
        let ev = &events[0];
        assert_eq!(ev["tenant"], result["tenant"]);
        assert_eq!(ev["outcome"], result["outcome"]);
        assert_eq!(ev["reason"], result["reason"]);
        assert_eq!(ev["files"], result["files"]);
        assert_eq!(ev["bytes"], result["bytes"]);
        assert_eq!(ev["restore_seconds"], result["restore_seconds"]);
        assert_eq!(ev["rto_seconds"], result["rto_seconds"]);
        assert_eq!(ev["snapshot"], result["snapshot"]);
        if !passed {
            assert_eq!(doc["error"]["kind"], result["reason"]);
        }
        let job = ran.events("job.finished");
        assert_eq!(job.len(), 1);
        assert_eq!(
            job[0]["outcome"],
            if passed { "success" } else { "failure" }
        );
        if !passed {
            assert_eq!(job[0]["error_kind"], result["reason"]);
        }
        // The newest stored report is this drill.
        let tenant = result["tenant"].as_str().unwrap();
        let reports = self.path().join("custos-data/state/reports").join(tenant);
        let mut names: Vec<_> = fs::read_dir(&reports)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with("-drill.json"))
            .collect();
        names.sort();
        let stored: Value =
            serde_json::from_slice(&fs::read(names.last().unwrap()).unwrap()).unwrap();
        assert_eq!(stored["result"], result);
        assert_eq!(
            stored["outcome"],
            if passed { "success" } else { "failure" }
        );
        if !passed {
            assert_eq!(stored["error_kind"], result["reason"]);
        }
        assert_eq!(stored["gauges"]["passed"], if passed { 1.0 } else { 0.0 });
        (ran.code, result)
    }

    fn packs(&self, tenant: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self
            .path()
            .join("custos-data/store/tenants")
            .join(tenant)
            .join("packs");
        for sub in fs::read_dir(root).unwrap() {
            for p in fs::read_dir(sub.unwrap().path()).unwrap() {
                out.push(p.unwrap().path());
            }
        }
        out.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
        out
    }
}

const HEALTHY: &str =
    "rto = \"10m\"\nverify_command = [\"test\", \"-s\", \"{file:data/hello.txt}\"]";

#[test]
fn cli_healthy_drill_passes_and_is_in_history() {
    let cli = Cli::new(HEALTHY);
    cli.backup("acme");
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["outcome"], "passed");
    assert_eq!(r["snapshot"].as_str().unwrap().len(), 64);
    assert_eq!(r["files"], 44);
    assert_eq!(r["files_verified"], 44);
    assert_eq!(r["bytes"], (3 << 20) + 12_000 + (1 << 20) + 310);
    assert!(r["restore_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(r["rto_seconds"], 600.0);
    assert_eq!(r["rto_met"], true);
    let v = &r["verify_command"];
    assert_eq!(v["passed"], true);
    assert_eq!(v["exit_code"], 0);
    assert!(v["argv"][2].as_str().unwrap().ends_with("/data/hello.txt"));
    let dir = PathBuf::from(r["scratch"]["dir"].as_str().unwrap());
    assert!(
        dir.starts_with(cli.path().join("tmp")),
        "TMPDIR is the default scratch"
    );
    assert_eq!(r["scratch"]["removed"], true);
    assert!(!dir.exists());

    // --keep: the private directory stays, mode 0700.
    let (_, r) = cli.drill(&["acme", "--keep", "--target", "kept"]);
    let dir = PathBuf::from(r["scratch"]["dir"].as_str().unwrap());
    assert!(dir.starts_with(cli.path().join("kept")));
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        fs::read(dir.join("data/hello.txt")).unwrap(),
        fs::read(cli.path().join("data/hello.txt")).unwrap()
    );

    // Human output, and the history.
    let ran = cli.run(&["drill", "acme"]);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(
        ran.stdout.starts_with("drill of acme PASSED"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("RTO 10m met"), "{}", ran.stdout);
    let h = cli.run(&["drill", "history", "acme", "--json"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    let drills = h.json()["result"]["drills"].as_array().unwrap().clone();
    assert_eq!(drills.len(), 3);
    assert!(drills.iter().all(|d| d["result"]["outcome"] == "passed"));
    let h = cli.run(&["drill", "history", "acme", "--last", "2"]);
    assert_eq!(h.code, 0);
    assert_eq!(h.stdout.lines().count(), 3, "{}", h.stdout);
    assert!(h.stdout.lines().nth(1).unwrap().contains("passed"));
}

#[test]
fn cli_flipped_byte_in_a_pack_is_corrupt_object() {
    let cli = Cli::new(HEALTHY);
    cli.backup("acme");
    let pack = &cli.packs("acme")[0];
    let mut bytes = fs::read(pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(pack, &bytes).unwrap();
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "corrupt_object", "{r}");
    assert_eq!(r["error_kind"], "corrupt_object");
    assert!(r["snapshot"].is_string(), "the report names the snapshot");
    assert_eq!(r["scratch"]["removed"], true);
}

#[test]
fn cli_deleted_pack_is_missing_object() {
    let cli = Cli::new(HEALTHY);
    cli.backup("acme");
    for p in cli.packs("acme") {
        fs::remove_file(p).unwrap();
    }
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "missing_object", "{r}");
}

#[test]
fn cli_verify_command_failure_and_timeout() {
    let cli = Cli::new(
        "verify_command = [\"sh\", \"-c\", \"echo checking; echo broken table >&2; exit 3\"]",
    );
    cli.backup("acme");
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "verify_command_failed", "{r}");
    let v = &r["verify_command"];
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout_tail"], "checking\n");
    assert_eq!(v["stderr_tail"], "broken table\n");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("status 3: broken table"),
        "{r}"
    );
    // The restore itself was fine and verified.
    assert_eq!(r["files_verified"], 44);

    // A command that hangs (and its children) is killed at the timeout.
    write_policies(
        cli.path(),
        "[drill]\nverify_command = [\"sh\", \"-c\", \"sleep 60 & sleep 60\"]\nverify_timeout = \"1s\"\n",
    );
    let t = Instant::now();
    let (code, r) = cli.drill(&["acme"]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "verify_command_failed");
    assert_eq!(r["verify_command"]["timed_out"], true);
    assert_eq!(r["verify_command"]["signal"], 9);

    // A {file:NAME} that is not in the snapshot fails the check, unrun.
    write_policies(
        cli.path(),
        "[drill]\nverify_command = [\"test\", \"-e\", \"{file:no/such.db}\"]\n",
    );
    let (_, r) = cli.drill(&["acme"]);
    assert_eq!(r["reason"], "verify_command_failed");
    assert!(
        r["verify_command"]["not_run"]
            .as_str()
            .unwrap()
            .contains("no/such.db is not in the restored snapshot")
    );
}

#[test]
fn cli_rto_below_the_measured_time_fails() {
    let cli = Cli::new("rto = \"1ms\"");
    cli.backup("acme");
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "rto_exceeded", "{r}");
    assert_eq!(r["rto_seconds"], 0.001);
    assert_eq!(r["rto_met"], false);
    assert!(r["restore_seconds"].as_f64().unwrap() > 0.001);
}

#[test]
fn cli_no_snapshot_key_unavailable_and_insufficient_space() {
    let cli = Cli::new(HEALTHY);
    // Never backed up, not even initialised.
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "no_snapshot", "{r}");
    assert_eq!(r["error_kind"], "tenant_not_found");
    // Initialised, no snapshot yet.
    let init = cli.run(&["tenant", "init", "acme"]);
    assert_eq!(init.code, 0, "{}", init.stderr);
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "no_snapshot", "{r}");
    // A snapshot id that does not exist.
    cli.backup("acme");
    let (_, r) = cli.drill(&["acme", "--snapshot", "0000abcd"]);
    assert_eq!(r["reason"], "no_snapshot", "{r}");
    // Random within a window that holds no snapshot: wait until the only one
    // is older than the window.
    std::thread::sleep(Duration::from_millis(1100));
    let (_, r) = cli.drill(&["acme", "--snapshot", "random", "--within", "1s"]);
    assert_eq!(r["reason"], "no_snapshot", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("within the last 1s")
    );

    // The scratch file system cannot hold the restore plus the reserve.
    write_policies(
        cli.path(),
        &format!("[drill]\n{HEALTHY}\nscratch_reserve = \"1000TiB\"\n"),
    );
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "insufficient_space", "{r}");
    assert!(r["scratch"]["dir"].is_null());
    write_policies(cli.path(), &format!("[drill]\n{HEALTHY}\n"));

    // The key file is gone: the data key cannot be unwrapped.
    fs::remove_file(cli.path().join("custos-data/keys/acme.key")).unwrap();
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "key_unavailable", "{r}");
}

#[test]
fn cli_usage_sample_and_a_tenant_named_history() {
    let cli = Cli::new(HEALTHY);
    cli.backup("acme");
    let (code, r) = cli.drill(&["acme", "--sample", "3", "--seed", "42"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["mode"], "sample");
    assert_eq!(r["seed"], 42);
    assert_eq!(
        r["sample"]["files"], 4,
        "3 sampled + the verify command's file"
    );
    assert_eq!(r["files_verified"], 4);
    // `--` makes "history" a tenant; without it, history is the subcommand.
    let (code, r) = cli.drill(&["--", "history"]);
    assert_eq!(code, 1);
    assert_eq!(r["tenant"], "history");
    assert_eq!(r["reason"], "no_snapshot");
    let h = cli.run(&["drill", "history", "history", "--json"]);
    assert_eq!(h.code, 0);
    assert_eq!(h.json()["result"]["drills"].as_array().unwrap().len(), 1);
    for bad in [
        &["drill", "acme", "--full", "--sample", "2"][..],
        &["drill", "acme", "--within", "1d"],
        &["drill", "acme", "--snapshot", "yesterday"],
        &["drill", "acme", "--sample", "0"],
        &["drill"],
    ] {
        let r = cli.run(bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
    }
}

// ---------------------------------------------------------------------------
// The shipped SQLite example

/// A temp directory whose custos.toml uses the repository's policies/.
fn sqlite_env() -> Cli {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("custos.toml"),
        format!(
            "policies_dir = \"{}\"\n",
            manifest_dir().join("policies").display()
        ),
    )
    .unwrap();
    Cli { tmp }
}

#[test]
fn sqlite_demo_drill_passes_end_to_end() {
    let cli = sqlite_env();
    cli.backup("sqlite-demo");
    cli.backup("sqlite-demo");
    let db = cli.path().join("custos-data/sqlite-demo/app.db");
    assert!(db.is_file(), "the source command creates the demo database");
    let (code, r) = cli.drill(&["sqlite-demo"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["files"], 1);
    let v = &r["verify_command"];
    assert_eq!(v["argv"][0], "sqlite3");
    assert_eq!(v["argv"][3], "PRAGMA integrity_check");
    assert_eq!(v["stdout_tail"], "ok\n");
    assert_eq!(v["stdout_matched"], true);
    assert_eq!(v["passed"], true);
    assert_eq!(r["rto_seconds"], 300.0);
    // The restored database holds the rows the backups wrote.
    let (_, r) = cli.drill(&["sqlite-demo", "--keep"]);
    let restored = PathBuf::from(r["scratch"]["dir"].as_str().unwrap()).join("app.db");
    let out = Command::new("sqlite3")
        .arg(&restored)
        .arg("SELECT count(*) FROM visits")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
}

#[test]
fn sqlite_demo_verify_step_fails_on_a_corrupted_database() {
    let cli = sqlite_env();
    // A database whose index disagrees with its table: the kind of damage a
    // byte-for-byte backup preserves faithfully and only the application's
    // own check finds. sqlite3 exits 0 and prints the problems.
    let db = cli.path().join("bad/app.db");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let made = Command::new("sqlite3")
        .arg(&db)
        .arg(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t(v); \
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<100) \
             INSERT INTO t(v) SELECT printf('value-%03d', x) FROM c;",
        )
        .status()
        .unwrap();
    assert!(made.success());
    let mut bytes = fs::read(&db).unwrap();
    let at = bytes
        .windows(9)
        .rposition(|w| w == b"value-050")
        .expect("index entry");
    bytes[at..at + 9].copy_from_slice(b"value-XYZ");
    fs::write(&db, &bytes).unwrap();

    // Tenant "broken-db": the same source shape (a command printing the
    // database as app.db) and exactly the [drill] section of sqlite-demo.toml.
    let shipped = fs::read_to_string(manifest_dir().join("policies/sqlite-demo.toml")).unwrap();
    let drill_section = &shipped[shipped.find("\n[drill]").unwrap()..];
    let policies = cli.path().join("policies");
    fs::create_dir_all(&policies).unwrap();
    fs::write(
        policies.join("broken-db.toml"),
        format!(
            "tenant = \"broken-db\"\nkey = \"local:broken-db\"\n[[sources]]\ntype = \"command\"\nname = \"app.db\"\ncommand = [\"cat\", \"{}\"]\n{drill_section}",
            db.display()
        ),
    )
    .unwrap();
    fs::write(
        cli.path().join("custos.toml"),
        "policies_dir = \"policies\"\n",
    )
    .unwrap();
    cli.backup("broken-db");
    let (code, r) = cli.drill(&["broken-db"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "verify_command_failed", "{r}");
    assert_eq!(r["files_verified"], 1, "the bytes restored faithfully");
    let v = &r["verify_command"];
    assert_eq!(v["exit_code"], 0, "integrity_check exits 0 on corruption");
    assert_eq!(v["stdout_matched"], false);
    assert!(
        v["stdout_tail"]
            .as_str()
            .unwrap()
            .contains("missing from index t_v"),
        "{v}"
    );
}

#[test]
fn systemd_drill_unit_runs_a_hardened_oneshot_drill() {
    // tests/it/systemd.rs runs systemd-analyze verify on every unit; this checks
    // what the drill template must say.
    let unit = fs::read_to_string(manifest_dir().join("systemd/custos-drill@.service")).unwrap();
    for needed in [
        "Type=oneshot",
        "ExecStart=/usr/bin/custos --config ${CONFIGURATION_DIRECTORY}/custos.toml drill -- %i",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed:?}");
    }
}

#[test]
fn policy_keys_for_drills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_policies(
        tmp.path(),
        "[drill]\nverify_command = [\"sqlite3\", \"{file:db/app.db}\", \"PRAGMA integrity_check\"]\nverify_expect_stdout = \"ok\"\nscratch_reserve = \"1GiB\"\nmode = \"sample\"\nsample_files = 7\npick = \"random\"\nwithin = \"7d\"\nrto = \"15m\"\n",
    );
    let p = custos::config::load_policy_file(&dir, Path::new("acme.toml")).unwrap();
    assert_eq!(p.drill.verify_expect_stdout.as_deref(), Some("ok"));
    assert_eq!(p.drill.scratch_reserve, 1 << 30);
    assert_eq!(
        p.drill.verify_command.as_ref().unwrap().files(),
        ["db/app.db"]
    );
    let o = DrillOptions::from_policy(&p.drill);
    assert_eq!(
        o.pick,
        SnapshotPick::Random {
            within: Duration::from_secs(7 * 86_400)
        }
    );
    assert_eq!(o.scope, Scope::Sample { files: 7 });
    assert_eq!(o.rto, Some(Duration::from_secs(900)));
    assert_eq!(o.scratch_reserve, 1 << 30);
    assert_eq!(o.verify.unwrap().expect_stdout.as_deref(), Some("ok"));

    // Judging output needs a command whose output to judge.
    write_policies(tmp.path(), "[drill]\nverify_expect_stdout = \"ok\"\n");
    let e = custos::config::load_policy_file(&dir, Path::new("acme.toml")).unwrap_err();
    assert!(
        e.to_string()
            .contains("drill.verify_expect_stdout: needs a verify_command"),
        "{e}"
    );
}

/// Issue 12, case 11: the drill of a busy or shredded tenant failed with the
/// untyped reason `error`. The reason is now the kind of what stopped it:
/// `tenant_unavailable` for a shredded tenant; for a tenant whose lease a
/// backup holds, `lease_contended` (or a pass, where drills read beside
/// writers), never `error`.
#[test]
fn cli_busy_or_shredded_tenant_has_a_typed_reason() {
    // A second source, a command that waits for a gate file once it has
    // started: the backup holds the tenant's lease as long as the test wants.
    let cli = Cli::new(HEALTHY);
    let gate = cli.path().join("gate");
    let started = cli.path().join("started");
    fs::write(
        cli.path().join("policies/acme.toml"),
        format!(
            "{}\n[[sources]]\ntype = \"command\"\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"touch {}; while [ ! -e {} ]; do sleep 0.05; done; echo done\"]\n",
            fs::read_to_string(cli.path().join("policies/acme.toml")).unwrap(),
            started.display(),
            gate.display()
        ),
    )
    .unwrap();
    fs::write(&gate, b"").unwrap();
    cli.backup("acme");
    fs::remove_file(&gate).unwrap();
    fs::remove_file(&started).unwrap();
    /// Opens the gate when dropped, so a failing test leaves no backup waiting.
    struct Busy(std::process::Child, PathBuf);
    impl Drop for Busy {
        fn drop(&mut self) {
            let _ = fs::write(&self.1, b"");
            let _ = self.0.wait();
        }
    }
    let mut busy = Busy(
        Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["backup", "acme"])
            .current_dir(cli.path())
            .env_remove("CUSTOS_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        gate.clone(),
    );
    let waited = Instant::now();
    while !started.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the backup never reached its command source"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, r) = cli.drill(&["acme"]);
    fs::write(&gate, b"").unwrap();
    assert!(busy.0.wait().unwrap().success(), "the backup finished");
    if code == 1 {
        assert_eq!(r["reason"], "lease_contended", "{r}");
        assert_eq!(r["error_kind"], "lease_contended", "{r}");
        assert!(
            r["message"].as_str().unwrap().contains("backup"),
            "names the holder's job: {r}"
        );
    } else {
        assert_eq!(r["outcome"], "passed", "{r}");
    }

    let shred = cli.run(&["shred", "acme", "--confirm", "acme"]);
    assert_eq!(shred.code, 0, "{}\n{}", shred.stdout, shred.stderr);
    let (code, r) = cli.drill(&["acme"]);
    assert_eq!(code, 1);
    assert_eq!(r["reason"], "tenant_unavailable", "{r}");
    assert_eq!(r["error_kind"], "tenant_unavailable", "{r}");
    assert!(r["message"].as_str().unwrap().contains("shredded"), "{r}");
}

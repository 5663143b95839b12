//! Readers run beside writers, deleters never break a reader, nothing waits
//! for a dead process, `custos unlock`, and policy drift does not block a
//! restore (issue 13). Everything goes through the `custos` binary.
//!
//! A long backup is made long without timing: its policy adds a command
//! source that streams a large file and then waits for a file the test
//! creates (`RELEASE`), so the backup cannot end before the test lets it.
//! A slow restore uses the store fault injector (`CUSTOS_FAULTS`, latency on
//! pack reads).
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Cli, Run};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_custos");

/// A test installation: the CLI helper, the tenant's key and extra
/// environment (AWS for the S3 variant).
struct Site {
    cli: Cli,
    key: String,
    envs: Vec<(String, String)>,
}

impl Site {
    fn local() -> Site {
        Site {
            cli: Cli::new(),
            key: "local:alpha".into(),
            envs: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.cli.path()
    }

    fn envs(&self) -> Vec<(&str, &str)> {
        self.envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn run(&self, args: &[&str]) -> Run {
        self.cli.run_env(args, &self.envs())
    }

    fn run_with(&self, args: &[&str], extra: &[(&str, &str)]) -> Run {
        let mut envs = self.envs();
        envs.extend_from_slice(extra);
        self.cli.run_env(args, &envs)
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ok(&a);
        r.json()["result"].clone()
    }

    /// Starts custos in the background.
    fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(self.path().join("custos.toml"))
            .args(args)
            .env("CUSTOS_LOG", "warn")
            .env("CUSTOS_LOG_FORMAT", "text")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KMS")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in self.envs().into_iter().chain(extra.iter().copied()) {
            cmd.env(k, v);
        }
        cmd.spawn().expect("custos starts")
    }

    /// Writes the tenant's policy: `data` backed up as source `data`, plus,
    /// with `stream`, a command source that streams the file and then waits
    /// for `RELEASE` (so the backup runs until the test lets it end).
    fn policy(&self, data: &Path, stream: Option<&Path>, key: &str) {
        let mut text = format!(
            "tenant = \"alpha\"\nkey = \"{key}\"\n\n[[sources]]\ntype = \"path\"\nname = \"data\"\npath = \"{}\"\n",
            data.display()
        );
        if let Some(big) = stream {
            let release = self.release();
            text.push_str(&format!(
                "\n[[sources]]\ntype = \"command\"\nname = \"stream\"\ncommand = [\"sh\", \"-c\", \"cat '{}' && while [ ! -e '{}' ] && kill -0 $PPID 2>/dev/null; do sleep 0.05; done\"]\n",
                big.display(),
                release.display()
            ));
        }
        text.push_str("\n[backup]\npack_size = \"8MiB\"\n");
        fs::write(self.path().join("policies/alpha.toml"), text).unwrap();
    }

    fn release(&self) -> PathBuf {
        self.path().join("RELEASE")
    }

    /// The tenant-scoped store, through the library (to look at lock records).
    fn store(&self) -> custos::store::TenantStore {
        let cfg = custos::config::Config::load(&self.path().join("custos.toml")).unwrap();
        let store = custos::context::open_store(&cfg).unwrap();
        custos::store::TenantStore::new(store, &custos::TenantId::new("alpha").unwrap())
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Random files: `files` × `mib` MiB under `dir`, plus a small text file.
fn tree(dir: &Path, prefix: &str, files: usize, mib: usize) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    let mut buf = vec![0u8; mib << 20];
    for i in 0..files {
        custos::util::fill_random(&mut buf);
        fs::write(dir.join(format!("sub/{prefix}-{i}.bin")), &buf).unwrap();
    }
    fs::write(dir.join("note.txt"), format!("{prefix}\n").repeat(100)).unwrap();
}

/// A file of `mib` MiB of random bytes, written 1 MiB at a time.
fn big_file(path: &Path, mib: usize) {
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        custos::util::fill_random(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Waits (a liveness bound, not a timing assertion) until `pred` holds; fails
/// early with the child's output if it exits meanwhile.
fn wait_until(what: &str, child: &mut Child, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !pred() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = output(child);
            panic!("{what}: the background custos ended first ({status}):\n{out}");
        }
        assert!(Instant::now() < deadline, "{what}: not reached in 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn output(child: &mut Child) -> String {
    let (out, err) = streams(child);
    format!("{out}{err}")
}

fn streams(child: &mut Child) -> (String, String) {
    use std::io::Read;
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (out, err)
}

/// Waits for a background custos; returns (exit code, stdout + stderr).
fn finish(child: Child) -> (i32, String) {
    let (code, out, err) = finish_streams(child);
    (code, format!("{out}{err}"))
}

/// Waits for a background custos; returns (exit code, stdout, stderr).
fn finish_streams(mut child: Child) -> (i32, String, String) {
    // Drain the pipes before waiting: a full pipe would block the child.
    let (out, err) = streams(&mut child);
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), out, err)
}

fn packs(site: &Site) -> usize {
    block_on(site.store().list(custos::store::layout::Dir::Packs))
        .unwrap()
        .len()
}

fn readers(site: &Site) -> usize {
    block_on(custos::store::readers::list(&site.store()))
        .unwrap()
        .len()
}

fn snapshot_ids(site: &Site) -> Vec<String> {
    site.json(&["snapshots", "alpha"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Pack reads answer slowly (up to 400 ms each), so a restore stays in
/// flight for seconds.
const SLOW_PACK_READS: &str = "latency=1,latency_max=400ms,ops=get,paths=packs/";

/// The whole scenario of the issue, on whatever store `site` is configured for.
fn readers_beside_writers(site: &Site) {
    let root = site.path().to_owned();
    // Snapshot 1: 48 MiB that no later snapshot keeps.
    let data1 = root.join("data1");
    tree(&data1, "old", 6, 8);
    site.policy(&data1, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let first = snapshot_ids(site);
    assert_eq!(first.len(), 1);
    let s1 = first[0].clone();

    // Snapshot 2, long: other files, and a 256 MiB stream that then waits.
    let data2 = root.join("data2");
    tree(&data2, "new", 2, 4);
    let big = root.join("big.bin");
    big_file(&big, 256);
    site.policy(&data2, Some(&big), &site.key);
    let before = packs(site);
    let mut backup = site.spawn(&["backup", "alpha", "--json"], &[]);
    // Readers start once the backup is uploading.
    wait_until("the backup uploads packs", &mut backup, || {
        packs(site) >= before + 3
    });

    // A restore of the previous snapshot, a drill and a check --read-data,
    // each successful and byte-exact, while the backup runs.
    let t1 = root.join("restore-during-backup");
    let r = site.json(&["restore", "alpha", &s1, "--target", t1.to_str().unwrap()]);
    assert!(r["files"].as_u64().unwrap() >= 7, "{r}");
    common::assert_same(&data1, &t1.join("data"));
    let drill = site.json(&["drill", "alpha", "--snapshot", &s1]);
    assert_eq!(drill["outcome"], "passed", "{drill}");
    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
    assert!(
        check["packs_read"].as_u64().unwrap() > before as u64,
        "{check}"
    );
    assert_eq!(
        snapshot_ids(site),
        first,
        "the running backup committed nothing yet"
    );
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup is still running when the readers are done"
    );

    fs::write(site.release(), b"").unwrap();
    let (code, out) = finish(backup);
    assert_eq!(code, 0, "the long backup:\n{out}");
    let ids = snapshot_ids(site);
    assert_eq!(ids.len(), 2, "{ids:?}");
    site.policy(&data2, None, &site.key);

    // A prune that removes snapshot 1's packs while a restore of snapshot 1
    // is in flight: the restore completes byte-exact (the prune leaves what
    // it reads until it is done).
    let t2 = root.join("restore-during-prune");
    let restore = site.spawn(
        &[
            "restore",
            "alpha",
            &s1,
            "--target",
            t2.to_str().unwrap(),
            "--json",
        ],
        &[("CUSTOS_FAULTS", SLOW_PACK_READS)],
    );
    let mut restore = restore;
    wait_until("the restore registers", &mut restore, || readers(site) > 0);
    let pruned = site.json(&["forget", "alpha", "--keep-last", "1", "--prune"]);
    let (code, out) = finish(restore);
    assert_eq!(code, 0, "the restore beside the prune:\n{out}");
    common::assert_same(&data1, &t2.join("data"));
    let prune = &pruned["prune"];
    assert!(prune["deferred"].is_null(), "{pruned}");
    assert!(
        prune["packs_deleted"].as_u64().unwrap()
            + prune["packs_unreferenced_deleted"].as_u64().unwrap()
            >= 6,
        "snapshot 1's packs are gone: {pruned}"
    );
    // What is left is whole; no lock record is left behind.
    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
    assert_eq!(check["unreferenced_packs"], 0, "{check}");
    assert_eq!(readers(site), 0);
    assert_eq!(snapshot_ids(site).len(), 1);
    let err = site.run(&[
        "restore",
        "alpha",
        &s1,
        "--target",
        root.join("gone").to_str().unwrap(),
    ]);
    assert_eq!(err.code, 1, "snapshot 1 is forgotten");
}

#[test]
fn readers_beside_a_long_backup_and_a_prune_beside_a_restore_local_store() {
    readers_beside_writers(&Site::local());
}

#[test]
fn readers_beside_a_long_backup_and_a_prune_beside_a_restore_s3_and_kms() {
    if !common::require(common::strict(), "the S3 and KMS emulators (LocalStack)") {
        return;
    }
    let env = common::env;
    let endpoint = env("AWS_ENDPOINT_URL").unwrap_or_else(|| "http://127.0.0.1:4566".into());
    let kms_endpoint = env("AWS_ENDPOINT_URL_KMS").unwrap_or_else(|| endpoint.clone());
    let s3_endpoint = env("AWS_ENDPOINT_URL_S3").unwrap_or_else(|| endpoint.clone());
    let settings = custos::keys::aws_kms::AwsKmsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(kms_endpoint.clone()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        profile: None,
    };
    let key = block_on(async {
        let kms = custos::keys::aws_kms::AwsKmsProvider::new(&settings)
            .await
            .unwrap();
        kms.create_test_key(None).await.unwrap()
    });
    let cli = Cli::new();
    let bucket = env("CUSTOS_TEST_S3_BUCKET").unwrap_or_else(|| "custos-test".into());
    let run = hex::encode(custos::util::random_bytes::<6>());
    let root = cli.path().display().to_string();
    let config = cli.path().join("custos.toml");
    fs::write(
        &config,
        format!(
            "store = \"s3://{bucket}/readers-{run}\"\nstate_dir = \"{root}/state\"\npolicies_dir = \"{root}/policies\"\n\n\
             [local_keys]\ndir = \"{root}/keys\"\n\n[aws]\nregion = \"us-east-1\"\nkms_endpoint_url = \"{kms_endpoint}\"\n\
             s3_endpoint_url = \"{s3_endpoint}\"\nallow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    let site = Site {
        cli,
        key: key.to_string(),
        envs: vec![
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ],
    };
    readers_beside_writers(&site);
}

/// This host's process identity with another pid and start time, as a
/// lease or reader record of that process would carry it.
fn identity(pid: u32, start_time: u64) -> Value {
    let me = custos::store::holder::current().expect("a Linux /proc");
    serde_json::to_value(custos::store::holder::ProcessIdentity {
        pid,
        start_time,
        ..me.clone()
    })
    .unwrap()
}

/// A live process of this host (`sleep`) and its start time.
fn live_process() -> (Child, u64) {
    let child = Command::new("sleep").arg("600").spawn().unwrap();
    let custos::store::holder::ProcState::Running { start_time } =
        custos::store::holder::probe(child.id())
    else {
        panic!("sleep runs")
    };
    (child, start_time)
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn lease_file(site: &Site) -> PathBuf {
    site.cli.store().join("tenants/alpha/locks/lease")
}

fn plant_lease(site: &Site, holder: &str, process: Option<Value>, expires_in: chrono::Duration) {
    let now = chrono::Utc::now();
    let mut lease = serde_json::json!({
        "holder": holder,
        "job": "backup",
        "acquired_at": now,
        "expires_at": now + expires_in,
        "renewed_at": now,
    });
    if let Some(p) = process {
        lease["process"] = p;
    }
    fs::create_dir_all(lease_file(site).parent().unwrap()).unwrap();
    fs::write(lease_file(site), serde_json::to_vec(&lease).unwrap()).unwrap();
}

fn plant_reader(
    site: &Site,
    holder: &str,
    process: Option<Value>,
    expires_in: chrono::Duration,
) -> PathBuf {
    let now = chrono::Utc::now();
    let mut rec = serde_json::json!({
        "holder": holder,
        "job": "restore",
        "started_at": now,
        "renewed_at": now,
        "expires_at": now + expires_in,
    });
    if let Some(p) = process {
        rec["process"] = p;
    }
    let dir = site.cli.store().join("tenants/alpha/locks/readers");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(hex::encode(custos::util::random_bytes::<16>()));
    fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    path
}

fn audit_events(site: &Site, event: &str) -> Vec<Value> {
    site.ok(&["audit", "show", "--tenant", "alpha", "--json"])
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

/// A site whose leases last an hour: only dead-holder detection frees one early.
fn site_with_hour_leases() -> Site {
    let site = Site::local();
    let d = site.path().display().to_string();
    fs::write(
        site.path().join("custos.toml"),
        format!(
            "store = \"file://{d}/store\"\nstate_dir = \"{d}/state\"\npolicies_dir = \"{d}/policies\"\n[local_keys]\ndir = \"{d}/keys\"\n[daemon]\nlease_ttl = \"1h\"\n"
        ),
    )
    .unwrap();
    site
}

/// `kill -9` of a backup: at once `check --read-data`, `restore` and a new
/// backup succeed, with leases that last an hour. The takeover is an event
/// and an audit record naming the dead holder.
#[test]
fn nothing_waits_for_a_killed_backup() {
    let site = site_with_hour_leases();
    let root = site.path().to_owned();
    let data = root.join("data");
    tree(&data, "a", 2, 2);
    site.policy(&data, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let big = root.join("big.bin");
    big_file(&big, 16);
    site.policy(&data, Some(&big), &site.key);
    let mut backup = site.spawn(&["backup", "alpha"], &[]);
    let pid = backup.id();
    wait_until("the backup holds the lease", &mut backup, || {
        fs::read(lease_file(&site))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|l| {
                l["released"].is_null()
                    && l["holder"]
                        .as_str()
                        .unwrap_or("")
                        .contains(&format!(":{pid}:"))
            })
    });
    backup.kill().unwrap(); // SIGKILL
    backup.wait().unwrap();
    site.policy(&data, None, &site.key);

    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
    let target = root.join("restored");
    site.ok(&[
        "restore",
        "alpha",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    common::assert_same(&data, &target.join("data"));
    let r = site.run_with(
        &["backup", "alpha"],
        &[("CUSTOS_LOG", "warn"), ("CUSTOS_LOG_FORMAT", "json")],
    );
    assert_eq!(r.code, 0, "a new backup at once:\n{}", r.stderr);
    let takeover = r
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "lease.takeover")
        .unwrap_or_else(|| panic!("no lease.takeover event:\n{}", r.stderr));
    let reason = takeover["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("process {pid}")), "{takeover}");
    let audited = audit_events(&site, "lease.takeover");
    assert_eq!(audited.len(), 1, "{audited:?}");
    let details = &audited[0]["details"];
    assert!(
        details["previous_holder"]
            .as_str()
            .unwrap()
            .contains(&format!(":{pid}:")),
        "{details}"
    );
    assert!(
        details["reason"]
            .as_str()
            .unwrap()
            .contains("no longer exists"),
        "{details}"
    );
}

/// A lease whose pid now belongs to another process (same pid, another start
/// time) is taken over; one whose process runs (same start time) is not, and
/// readers do not wait for it either.
#[test]
fn a_reused_pid_is_not_mistaken_for_the_holder_and_a_live_holder_keeps_its_lease() {
    let site = site_with_hour_leases();
    let root = site.path().to_owned();
    let data = root.join("data");
    tree(&data, "a", 1, 1);
    site.policy(&data, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let (mut sleeper, start) = live_process();
    let pid = sleeper.id();

    // The live holder keeps its lease: writers wait, readers do not.
    plant_lease(
        &site,
        &format!("host:{pid}:live"),
        Some(identity(pid, start)),
        chrono::Duration::hours(1),
    );
    let r = site.run(&["backup", "alpha", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["error"]["kind"], "lease_contended", "{}", r.stdout);
    let check = site.json(&["check", "alpha"]);
    assert_eq!(check["faults"], serde_json::json!([]));
    let target = root.join("r1");
    site.ok(&[
        "restore",
        "alpha",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    common::assert_same(&data, &target.join("data"));

    // The same pid with another start time: the holder is gone, its pid reused.
    plant_lease(
        &site,
        &format!("host:{pid}:old"),
        Some(identity(pid, start + 1)),
        chrono::Duration::hours(1),
    );
    site.ok(&["backup", "alpha"]);
    let audited = audit_events(&site, "lease.takeover");
    assert!(
        audited.iter().any(|a| a["details"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("now belongs to another process")),
        "{audited:?}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// `custos unlock`: stale (expired, unreadable) and dead holders' records are
/// removed; live ones are kept, and removed with `--force` after their
/// holder is printed; every removal is an audit record; the lease is marked
/// released, never deleted.
#[test]
fn unlock_removes_stale_and_dead_records_and_with_force_live_ones() {
    let site = site_with_hour_leases();
    let data = site.path().join("data");
    tree(&data, "a", 1, 1);
    site.policy(&data, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let (mut sleeper, start) = live_process();
    let live_pid = sleeper.id();

    // Nothing to do on a tenant whose lease was released.
    let u = site.json(&["unlock", "alpha"]);
    assert_eq!(u["locks"][0]["state"], "released", "{u}");
    assert_eq!(u["locks"][0]["action"], "none", "{u}");

    // A dead holder's lease, an expired reader, an unreadable reader, a
    // dead reader, and a live reader (this host) are planted.
    plant_lease(
        &site,
        "host:1:dead",
        Some(identity(dead_pid(), 1)),
        chrono::Duration::hours(1),
    );
    let expired = plant_reader(&site, "elsewhere:7:aa", None, chrono::Duration::seconds(-5));
    let dead = plant_reader(
        &site,
        "host:2:bb",
        Some(identity(dead_pid(), 1)),
        chrono::Duration::hours(1),
    );
    let live = plant_reader(
        &site,
        &format!("host:{live_pid}:cc"),
        Some(identity(live_pid, start)),
        chrono::Duration::hours(1),
    );
    let dir = site.cli.store().join("tenants/alpha/locks/readers");
    let garbage = dir.join(hex::encode(custos::util::random_bytes::<16>()));
    fs::write(&garbage, b"not a record").unwrap();

    let r = site.ok(&["unlock", "alpha"]);
    assert!(
        r.stdout.contains("--force"),
        "says how to remove the rest:\n{}",
        r.stdout
    );
    let u = site.json(&["unlock", "alpha"]);
    // (The second run finds only what the first kept.)
    assert_eq!(u["locks"].as_array().unwrap().len(), 2, "{u}");
    assert!(!expired.exists() && !dead.exists() && !garbage.exists());
    assert!(live.exists(), "a live reader is kept");
    let lease: Value = serde_json::from_slice(&fs::read(lease_file(&site)).unwrap()).unwrap();
    assert_eq!(lease["released"], true, "{lease}");
    assert_eq!(
        lease["holder"], "host:1:dead",
        "marked released, not deleted: {lease}"
    );
    let removals = audit_events(&site, "unlock");
    assert_eq!(removals.len(), 4, "{removals:?}");
    let states: Vec<&str> = removals
        .iter()
        .map(|a| a["details"]["state"].as_str().unwrap())
        .collect();
    for s in ["dead", "expired", "unreadable"] {
        assert!(states.contains(&s), "{states:?}");
    }

    // A live lease of another host is kept too, until --force.
    plant_lease(&site, "other-host:9:dd", None, chrono::Duration::hours(1));
    let u = site.json(&["unlock", "alpha"]);
    let kept: Vec<&Value> = u["locks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["action"] == "kept")
        .collect();
    assert_eq!(kept.len(), 2, "{u}");
    let r = site.ok(&["unlock", "alpha", "--force"]);
    assert!(
        r.stdout
            .contains("--force: removing the live lease of other-host:9:dd (backup)")
            && r.stdout.contains(&format!(
                "--force: removing the live reader of host:{live_pid}:cc (restore)"
            )),
        "{}",
        r.stdout
    );
    assert!(!live.exists());
    let lease: Value = serde_json::from_slice(&fs::read(lease_file(&site)).unwrap()).unwrap();
    assert_eq!(lease["released"], true, "{lease}");
    let forced: Vec<Value> = audit_events(&site, "unlock")
        .into_iter()
        .filter(|a| a["details"]["forced"] == true)
        .collect();
    assert_eq!(forced.len(), 2, "{forced:?}");
    // The tenant is free at once.
    site.ok(&["backup", "alpha"]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// After `rotate --replace-cmk`, a policy still naming the old key lets
/// restore, drill, check and snapshots run (with `policy.stale_key`), and
/// still refuses backup and rotate.
#[test]
fn policy_drift_does_not_block_a_restore() {
    let site = Site::local();
    let root = site.path().to_owned();
    let data = root.join("data");
    tree(&data, "a", 1, 1);
    site.policy(&data, None, "local:alpha");
    site.ok(&["backup", "alpha"]);
    let new_key = custos::keys::KeyRef::local("alpha-new").unwrap();
    block_on(async {
        use custos::keys::KeyProvider;
        custos::keys::local::LocalKeyProvider::new(root.join("keys"))
            .unwrap()
            .create_key(&new_key)
            .await
            .unwrap()
    });
    site.ok(&["rotate", "alpha", "--replace-cmk", "local:alpha-new"]);
    // The policy still names local:alpha.
    let target = root.join("restored");
    let r = site.run_with(
        &[
            "restore",
            "alpha",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
        &[("CUSTOS_LOG", "warn")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("policy.stale_key") && r.stderr.contains("local:alpha-new"),
        "the warning says what to change:\n{}",
        r.stderr
    );
    common::assert_same(&data, &target.join("data"));
    site.ok(&["drill", "alpha"]);
    site.ok(&["check", "alpha", "--read-data"]);
    site.ok(&["snapshots", "alpha"]);
    for args in [
        &["backup", "alpha"][..],
        &["rotate", "alpha", "--new-epoch"][..],
    ] {
        let mut a = args.to_vec();
        a.push("--json");
        let r = site.run(&a);
        assert_eq!(r.code, 1, "{args:?}");
        assert_eq!(r.json()["error"]["kind"], "invalid_policy", "{args:?}");
    }
}

/// A tenant shred is the one writer that may cut a reader off: a restore in
/// flight either completes byte-exact or fails with `tenant_unavailable` or
/// `key_unavailable` (never another kind, never a crash).
#[test]
fn a_tenant_shred_cuts_a_restore_off_cleanly() {
    let site = Site::local();
    let root = site.path().to_owned();
    let data = root.join("data");
    tree(&data, "a", 6, 4);
    site.policy(&data, None, "local:alpha");
    site.ok(&["backup", "alpha"]);
    let target = root.join("restored");
    let mut restore = site.spawn(
        &[
            "restore",
            "alpha",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--json",
        ],
        &[("CUSTOS_FAULTS", SLOW_PACK_READS)],
    );
    wait_until("the restore registers", &mut restore, || readers(&site) > 0);
    site.ok(&["shred", "alpha", "--confirm", "alpha"]);
    let (code, out, err) = finish_streams(restore);
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    if code == 0 {
        common::assert_same(&data, &target.join("data"));
    } else {
        assert_eq!(code, 1, "{out}\n{err}");
        let kind = doc["error"]["kind"].as_str().unwrap();
        assert!(
            kind == "tenant_unavailable" || kind == "key_unavailable",
            "{out}\n{err}"
        );
        // No partial file in place: whatever the cut-off restore left is a
        // whole copy of a source file, under its own name.
        for f in common::files_under(&target) {
            let rel = f
                .strip_prefix(target.join("data"))
                .unwrap_or_else(|_| panic!("{}", f.display()));
            let src = data.join(rel);
            assert!(
                src.is_file() && fs::read(&src).unwrap() == fs::read(&f).unwrap(),
                "a partial or unknown file was left in place: {}",
                f.display()
            );
        }
    }
    let r = site.run(&[
        "restore",
        "alpha",
        "latest",
        "--target",
        root.join("after").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        r.json()["error"]["kind"],
        "tenant_unavailable",
        "{}",
        r.stdout
    );
}

/// `custos unlock --force` removes live readers' records; a prune then
/// deletes what they were reading. Each reader must fail with `reader_lost`
/// (a restore may instead complete byte-exact), and at its end, not only if
/// a renewal (every third of the TTL) happens to notice: before the fix a
/// `check --read-data` reported the pruned packs as `missing_object` faults
/// (corruption that is not there) and the restore failed `missing_object`.
#[test]
fn readers_cut_off_by_unlock_force_fail_as_lost_not_as_corruption() {
    let site = Site::local();
    let root = site.path().to_owned();
    let data1 = root.join("data1");
    tree(&data1, "old", 6, 8);
    site.policy(&data1, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let s1 = snapshot_ids(&site)[0].clone();
    let data2 = root.join("data2");
    tree(&data2, "new", 1, 1);
    site.policy(&data2, None, &site.key);
    site.ok(&["backup", "alpha"]);

    let slow = [(
        "CUSTOS_FAULTS",
        "latency=1,latency_max=2s,ops=get,paths=packs/",
    )];
    let target = root.join("restored");
    let mut check = site.spawn(&["check", "alpha", "--read-data", "--json"], &slow);
    let restore = site.spawn(
        &[
            "restore",
            "alpha",
            &s1,
            "--target",
            target.to_str().unwrap(),
            "--json",
        ],
        &slow,
    );
    wait_until("both readers register", &mut check, || readers(&site) >= 2);
    site.ok(&["unlock", "alpha", "--force"]);
    assert_eq!(readers(&site), 0, "unlock --force removed both records");
    let pruned = site.json(&["forget", "alpha", "--keep-last", "1", "--prune"]);
    assert!(pruned["prune"]["deferred"].is_null(), "{pruned}");

    let (code, out, err) = finish_streams(check);
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_ne!(code, 0, "{out}\n{err}");
    assert_eq!(doc["error"]["kind"], "reader_lost", "{out}\n{err}");
    let (code, out, err) = finish_streams(restore);
    if code == 0 {
        common::assert_same(&data1, &target.join("data"));
    } else {
        let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        assert_eq!(doc["error"]["kind"], "reader_lost", "{out}\n{err}");
    }
    // Nothing was corrupt: a check now finds no fault.
    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
}

/// An epoch shred with a re-wrap ends by destroying the tenant's old key. A
/// reader that registered after the shred's deletion plan (so the shred did
/// not wait for it there) and read an envelope while it was still under the
/// old key must not have that key destroyed before it unwraps. Before the
/// fix a check beside the shred failed on the destroyed key, as if the
/// tenant's live data were lost; now the shred waits for it before the
/// destruction (as `rotate --schedule-old-key-deletion` does).
#[test]
fn an_epoch_shred_destroys_no_key_a_reader_is_about_to_use() {
    let site = Site::local();
    let root = site.path().to_owned();
    let data1 = root.join("data1");
    tree(&data1, "old", 1, 1);
    site.policy(&data1, None, &site.key);
    site.ok(&["backup", "alpha"]);
    site.ok(&["rotate", "alpha", "--new-epoch"]);
    let data2 = root.join("data2");
    tree(&data2, "new", 1, 1);
    site.policy(&data2, None, &site.key);
    site.ok(&["backup", "alpha"]);
    site.ok(&["forget", "alpha", "--keep-last", "1", "--prune"]);

    // A live reader of this host holds the shred in its wait before deleting.
    let (mut sleeper, start) = live_process();
    let pid = sleeper.id();
    plant_reader(
        &site,
        &format!("host:{pid}:live"),
        Some(identity(pid, start)),
        chrono::Duration::hours(1),
    );
    let mut shred = site.spawn(
        &[
            "shred",
            "alpha",
            "--epoch",
            "1",
            "--rewrap",
            "--confirm",
            "alpha",
            "--json",
        ],
        &[],
    );
    let plans = site.cli.store().join("tenants/alpha/locks/deletions");
    wait_until("the shred publishes its plan", &mut shred, || {
        fs::read_dir(&plans).is_ok_and(|mut d| d.next().is_some())
    });
    // A check registers after the plan and reads epoch 2's envelope, still
    // under the old key; its key provider answers slowly.
    let mut check = site.spawn(
        &["check", "alpha", "--json"],
        &[("CUSTOS_KEY_FAULTS", "unwrap_delay=10s")],
    );
    wait_until("the check registers", &mut check, || readers(&site) >= 2);
    std::thread::sleep(Duration::from_millis(1500));
    // The planted reader's process ends: the shred goes on.
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();

    let (code, out, err) = finish_streams(check);
    assert_eq!(code, 0, "the check beside the shred:\n{out}\n{err}");
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(doc["result"]["faults"], serde_json::json!([]), "{out}");
    let (code, out) = finish(shred);
    assert_eq!(code, 0, "the shred:\n{out}");
    // The key is destroyed now, and the tenant reads under the new one.
    assert!(site.path().join("keys/alpha.destroyed").exists());
    site.policy(&data2, None, "local:alpha-2");
    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
}

/// A reader record that never goes away (here one a store writer planted,
/// naming another host and an expiry far away) defers every prune: denial,
/// which a store writer may cause, but it must be said plainly on the
/// summary (before: "deleted 0 unused … 0 B freed", the deferral only in a
/// log event), and `custos unlock --force` must clear it.
#[test]
fn a_deferred_prune_says_so_and_unlock_force_clears_a_planted_reader() {
    let site = Site::local();
    let config = site.path().join("custos.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str("[daemon]\nreader_wait = \"1s\"\n");
    fs::write(&config, text).unwrap();
    let root = site.path().to_owned();
    let data1 = root.join("data1");
    tree(&data1, "old", 2, 1);
    site.policy(&data1, None, &site.key);
    site.ok(&["backup", "alpha"]);
    let data2 = root.join("data2");
    tree(&data2, "new", 1, 1);
    site.policy(&data2, None, &site.key);
    site.ok(&["backup", "alpha"]);
    site.ok(&["forget", "alpha", "--keep-last", "1"]);
    let planted = plant_reader(
        &site,
        "elsewhere:1:planted",
        None,
        chrono::Duration::days(365 * 100),
    );
    let before = packs(&site);

    let r = site.ok(&["prune", "alpha"]);
    assert!(
        r.stdout.contains("prune deferred") && r.stdout.contains("elsewhere:1:planted"),
        "{}",
        r.stdout
    );
    assert_eq!(packs(&site), before, "nothing deleted under the reader");
    let r = site.ok(&["unlock", "alpha"]);
    assert!(r.stdout.contains("kept"), "{}", r.stdout);
    assert!(
        planted.exists(),
        "a live-looking record stays without --force"
    );
    site.ok(&["unlock", "alpha", "--force"]);
    assert!(!planted.exists());
    let r = site.ok(&["prune", "alpha"]);
    assert!(!r.stdout.contains("deferred"), "{}", r.stdout);
    assert!(packs(&site) < before, "{}", r.stdout);
    let check = site.json(&["check", "alpha", "--read-data"]);
    assert_eq!(check["faults"], serde_json::json!([]), "{check}");
}

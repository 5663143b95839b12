//! The daemon, as systemd runs it: the real binary with a temporary
//! custos.toml and policies directory, per-second schedules, signals, the
//! sd_notify socket, the metrics endpoint, and two daemons sharing one store
//! (a local directory always; S3 on the emulators with CUSTOS_TEST_EMULATORS=1).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_custos");

/// A running `custos daemon` whose JSON log lines (stdout: the service logs
/// there, for journald) are collected.
struct Daemon {
    name: String,
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Daemon {
    fn spawn(name: &str, config: &Path, args: &[&str], env: &[(&str, String)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .arg("daemon")
            .args(args)
            .env("CUSTOS_LOG_FORMAT", "json")
            .env("CUSTOS_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("custos daemon starts");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = events.clone();
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{label}] {line}");
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap().push(v);
            }
        });
        Daemon {
            name: name.to_owned(),
            child,
            events,
        }
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == name)
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Waits for an event (after index `from`) matching `pred`.
    fn wait_for(&self, from: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|e| pred(e))
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for an event",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not exit in time",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A daemon's configuration and directories under `root`.
struct Site {
    root: PathBuf,
    config: PathBuf,
}

fn site(root: &Path, name: &str, store: &str, keys: &Path, policies: &Path, extra: &str) -> Site {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("custos.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"{store}\"\nstate_dir = \"state\"\npolicies_dir = \"{}\"\n\n[local_keys]\ndir = \"{}\"\n\n\
             [daemon]\nmax_concurrent_jobs = 2\njitter = \"0s\"\nshutdown_timeout = \"60s\"\nlease_ttl = \"10s\"\n{extra}",
            policies.display(),
            keys.display()
        ),
    )
    .unwrap();
    Site { root: dir, config }
}

/// Source files for a tenant.
fn source(root: &Path, tenant: &str) -> PathBuf {
    let dir = root.join("src").join(tenant);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..20 {
        std::fs::write(
            dir.join(format!("f{i}.txt")),
            format!("{tenant} file {i}\n").repeat(50),
        )
        .unwrap();
    }
    let mut big = vec![0u8; 300_000];
    custos::util::fill_random(&mut big);
    std::fs::write(dir.join("sub/random.bin"), &big).unwrap();
    dir
}

fn policy(policies: &Path, tenant: &str, src: &Path, sections: &str) {
    std::fs::write(
        policies.join(format!("{tenant}.toml")),
        format!(
            "tenant = \"{tenant}\"\nkey = \"local:{tenant}\"\n\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n\n{sections}",
            src.display()
        ),
    )
    .unwrap();
}

/// Every job report under a state directory: tenant → reports.
fn reports(state: &Path) -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    let Ok(dirs) = std::fs::read_dir(state.join("reports")) else {
        return out;
    };
    for d in dirs {
        let d = d.unwrap();
        let tenant = d.file_name().to_string_lossy().into_owned();
        let mut list = Vec::new();
        for f in std::fs::read_dir(d.path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "json") {
                list.push(serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap());
            }
        }
        out.insert(tenant, list);
    }
    out
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `custos check --read-data` of every tenant passes.
fn check_all(config: &Path, tenants: &[&str]) {
    for t in tenants {
        let out = Command::new(BIN)
            .args(["--config"])
            .arg(config)
            .args(["check", t, "--read-data"])
            .env("CUSTOS_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check {t} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Collects sd_notify datagrams sent to a socket the test owns.
fn notify_socket(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let messages = Arc::new(Mutex::new(Vec::new()));
    let sink = messages.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => sink
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if Arc::strong_count(&sink) == 1 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    messages
}

#[test]
fn daemon_runs_jobs_on_time_reloads_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let tenants = ["alpha", "bravo", "charlie"];
    for t in tenants {
        let src = source(root, t);
        policy(
            &policies,
            t,
            &src,
            "[backup]\nschedule = \"*/2 * * * * *\"\n\n[retention]\nkeep_last = 2\nschedule = \"1/3 * * * * *\"\n\n\
             [check]\nschedule = \"*/4 * * * * *\"\nread_data_fraction = 0.5\n",
        );
    }
    let keys = root.join("keys");
    let s = site(
        root,
        "d",
        "store",
        &keys,
        &policies,
        "metrics_listen = \"127.0.0.1:0\"\n",
    );
    let sock_path = root.join("notify.sock");
    let notes = notify_socket(&sock_path);

    let mut d = Daemon::spawn(
        "daemon",
        &s.config,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "3000000".into()),
        ],
    );
    let started = d.wait_for(0, Duration::from_secs(60), |e| {
        e["event"] == "daemon.started"
    });
    assert_eq!(started["tenants"], 3);
    assert_eq!(started["jobs"], 9);
    assert_eq!(started["mode"], "shared");
    assert_eq!(
        started["tick_ms"], 1000,
        "WatchdogSec=3s: tick a third of it"
    );
    let addr = d.wait_for(0, Duration::from_secs(10), |e| {
        e["event"] == "metrics.listening"
    })["addr"]
        .as_str()
        .unwrap()
        .to_owned();

    // Let the schedules run a while.
    std::thread::sleep(Duration::from_secs(9));
    let health = http_get(&addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_get(&addr, "/metrics");
    assert!(
        metrics.contains(
            "custos_job_runs_total{tenant=\"alpha\",kind=\"backup\",outcome=\"success\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("custos_job_last_success_timestamp_seconds{tenant=\"bravo\",kind=\"check\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("custos_key_epoch_age_seconds{tenant=\"charlie\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("custos_forget_snapshots_kept{tenant=\"alpha\"}"),
        "{metrics}"
    );
    // The daemon's audit log reports into the metrics; nothing failed.
    for counter in [
        "custos_audit_write_failures_total",
        "custos_audit_replication_failures_total",
    ] {
        assert!(metrics.contains(&format!("\n{counter} 0\n")), "{metrics}");
    }

    // SIGHUP with a broken policy for bravo and a valid change for charlie.
    let before_reload = d.count();
    let bravo = policies.join("bravo.toml");
    let good_bravo = std::fs::read_to_string(&bravo).unwrap();
    std::fs::write(
        &bravo,
        good_bravo.replace("keep_last = 2", "keep_last = -1"),
    )
    .unwrap();
    let charlie = policies.join("charlie.toml");
    let c = std::fs::read_to_string(&charlie).unwrap();
    std::fs::write(
        &charlie,
        c.replace(
            "schedule = \"*/2 * * * * *\"",
            "schedule = \"*/3 * * * * *\"",
        ),
    )
    .unwrap();
    let reload_at = Utc::now();
    d.signal("HUP");
    let rejected = d.wait_for(before_reload, Duration::from_secs(10), |e| {
        e["event"] == "policy.rejected"
    });
    assert!(
        rejected["file"].as_str().unwrap().ends_with("bravo.toml"),
        "{rejected}"
    );
    assert!(rejected["line"].as_u64().is_some(), "{rejected}");
    assert!(
        rejected["message"].as_str().unwrap().contains("keep_last"),
        "{rejected}"
    );
    assert_eq!(rejected["kept_previous"], true);
    let reloaded = d.wait_for(before_reload, Duration::from_secs(10), |e| {
        e["event"] == "policy.reloaded"
    });
    assert_eq!(reloaded["outcome"], "partial");
    assert_eq!(reloaded["changed"], "charlie");
    assert_eq!(reloaded["kept_previous"], "bravo");
    // bravo keeps running on its previous policy.
    let after = d.count();
    d.wait_for(after, Duration::from_secs(10), |e| {
        e["event"] == "job.finished"
            && e["tenant"] == "bravo"
            && e["job"] == "backup"
            && e["outcome"] == "success"
    });
    std::thread::sleep(Duration::from_secs(4));

    let stop_at = Utc::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(70));
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(d.events("daemon.stopped").len(), 1);
    assert!(d.events("job.abandoned").is_empty());
    assert!(d.events("job.unsupported").is_empty());

    // Every job ran, on time, never two writers of one tenant at once
    // (readers, check and drill, run beside them by design).
    let all = reports(&s.root.join("state"));
    for t in tenants {
        let mut list = all[t].clone();
        list.sort_by_key(|r| time(&r["started_at"]));
        let writers: Vec<_> = list
            .iter()
            .filter(|r| !matches!(r["job"].as_str(), Some("check" | "drill")))
            .collect();
        for pair in writers.windows(2) {
            assert!(
                time(&pair[0]["finished_at"]) <= time(&pair[1]["started_at"]),
                "{t}: {} and {} overlap",
                pair[0]["job"],
                pair[1]["job"]
            );
        }
        let mut slots = BTreeSet::new();
        let mut lateness = Vec::new();
        for r in &list {
            assert_eq!(r["outcome"], "success", "{r:#}");
            let job = r["job"].as_str().unwrap().to_owned();
            let slot = time(&r["result"]["scheduled"]["slot"]);
            // The first run of each job is the start-up catch-up of a past slot.
            let first = !slots.iter().any(|(j, _)| *j == job);
            assert!(slots.insert((job, slot)), "slot ran twice: {r:#}");
            let late = time(&r["started_at"]) - slot;
            assert!(late >= chrono::Duration::zero(), "{r:#}");
            if !first {
                lateness.push((late.num_milliseconds(), r["job"].to_string()));
            }
        }
        lateness.sort();
        eprintln!("{t}: start lateness (ms) {lateness:?}");
        let (worst, job) = lateness.last().unwrap();
        assert!(*worst < 3000, "{t} {job} started {worst} ms after its slot");
        let runs = |job: &str| list.iter().filter(|r| r["job"] == job).count();
        assert!(runs("backup") >= 5, "{t}: {} backups", runs("backup"));
        assert!(runs("forget") >= 3, "{t}: {} forgets", runs("forget"));
        assert!(runs("check") >= 2, "{t}: {} checks", runs("check"));
        // The checks read rotating halves of the packs.
        let halves: BTreeSet<u64> = list
            .iter()
            .filter(|r| r["job"] == "check")
            .map(|r| r["result"]["scheduled"]["read_data"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(halves, [1, 2].into(), "{t}");
    }
    // bravo kept backing up after the reload; charlie's backups moved to */3.
    let bravo_after = all["bravo"]
        .iter()
        .filter(|r| r["job"] == "backup" && time(&r["started_at"]) > reload_at)
        .count();
    assert!(
        bravo_after >= 2,
        "bravo ran {bravo_after} backups after the reload"
    );
    for r in all["charlie"].iter().filter(|r| {
        r["job"] == "backup" && time(&r["started_at"]) > reload_at + chrono::Duration::seconds(1)
    }) {
        let slot = time(&r["result"]["scheduled"]["slot"]);
        assert_eq!(slot.timestamp() % 3, 0, "charlie still on */2: {slot}");
        assert!(slot < stop_at);
    }
    let state: Value =
        serde_json::from_slice(&std::fs::read(s.root.join("state/daemon/schedule.json")).unwrap())
            .unwrap();
    assert!(
        state["tenants"]["alpha"]["jobs"]["backup"]["last_slot"].is_string(),
        "{state:#}"
    );
    assert_eq!(state["tenants"]["alpha"]["keys"]["epoch"], 1);

    // sd_notify: ready, status, watchdog, reload, stopping.
    std::thread::sleep(Duration::from_millis(300));
    let notes = notes.lock().unwrap().clone();
    let first = notes.first().expect("sd_notify messages");
    assert!(
        first.contains("READY=1\n") && first.contains("STATUS=3 tenants, 9 jobs scheduled"),
        "{notes:?}"
    );
    assert!(
        notes.iter().filter(|n| *n == "WATCHDOG=1\n").count() >= 5,
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("STATUS=") && n.contains("running")),
        "{notes:?}"
    );
    let reloading = notes
        .iter()
        .position(|n| n.starts_with("RELOADING=1\nMONOTONIC_USEC="))
        .expect("RELOADING=1");
    assert!(
        notes[reloading..]
            .iter()
            .any(|n| n.starts_with("READY=1\n")),
        "{notes:?}"
    );
    // STOPPING=1 comes last, but for watchdog pings while jobs finish.
    let stopping = notes
        .iter()
        .rposition(|n| n.starts_with("STOPPING=1\n"))
        .expect("STOPPING=1");
    assert!(
        notes[stopping + 1..]
            .iter()
            .all(|n| n.starts_with("WATCHDOG=1")),
        "{notes:?}"
    );

    // What the daemon left passes a full check.
    std::fs::write(&bravo, good_bravo).unwrap();
    check_all(&s.config, &tenants);
}

#[test]
fn once_runs_what_is_due_reports_and_fails_honestly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let src = source(root, "one");
    policy(
        &policies,
        "one",
        &src,
        "[backup]\nschedule = \"0 2 * * *\"\n\n[check]\nschedule = \"0 4 * * 0\"\n",
    );
    let keys = root.join("keys");
    let s = site(root, "d", "store", &keys, &policies, "");
    let once = |json: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&s.config)
            .args(["daemon", "--once"]);
        if json {
            cmd.arg("--json");
        }
        cmd.env("CUSTOS_LOG_FORMAT", "json").output().unwrap()
    };
    // A job that never ran is due: backup, then check, in that order.
    let out = once(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("custos daemon --once: 2 job(s) of 1 tenant(s): 2 succeeded"),
        "{text}"
    );
    let backup = text.find("one     backup  success").expect(&text);
    let check = text.find("one     check   success").expect(&text);
    assert!(backup < check, "{text}");
    // Run again: nothing is due until the next slot.
    let out = once(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("custos daemon --once: nothing due (1 tenants; next: one/"),
        "{text}"
    );

    // A job kind this build cannot run, and a broken policy: reported, exit 1,
    // while the valid tenant's due job still runs.
    let src2 = source(root, "two");
    policy(
        &policies,
        "two",
        &src2,
        "[backup]\nschedule = \"0 2 * * *\"\n\n[shred_me]\n",
    );
    let src3 = source(root, "three");
    policy(
        &policies,
        "three",
        &src3,
        "[backup]\nschedule = \"0 3 * * *\"\n\n[drill]\nschedule = \"0 5 * * 1\"\n",
    );
    let out = once(true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    let runs = doc["result"]["runs"].as_array().unwrap();
    let outcome = |t: &str, j: &str| {
        runs.iter()
            .find(|r| r["tenant"] == t && r["job"] == j)
            .map(|r| r["outcome"].as_str().unwrap().to_owned())
    };
    assert_eq!(outcome("three", "backup").as_deref(), Some("success"));
    if custos::daemon::registry::launcher(custos::daemon::registry::ScheduledJob::Drill).is_none() {
        assert_eq!(outcome("three", "drill").as_deref(), Some("unsupported"));
        let logs = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            logs.matches("\"event\":\"job.unsupported\"").count(),
            1,
            "{logs}"
        );
    }
    assert_eq!(
        outcome("two", "backup"),
        None,
        "a refused policy is not run"
    );
    assert!(doc["result"]["policies_rejected"].as_u64().unwrap() >= 1);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("\"event\":\"policy.rejected\""), "{logs}");
    assert!(logs.contains("two.toml"), "{logs}");
}

/// Two daemons over one store: every (tenant, job, slot) runs exactly once.
fn two_daemons_share_a_store(store: &str, label: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let tenants = ["t1", "t2", "t3"];
    for t in tenants {
        let src = source(root, t);
        policy(
            &policies,
            t,
            &src,
            "[backup]\nschedule = \"*/2 * * * * *\"\n\n[retention]\nkeep_last = 2\nschedule = \"1/4 * * * * *\"\n\n\
             [check]\nschedule = \"1/4 * * * * *\"\nread_data_fraction = 0.5\n",
        );
    }
    // One store and one set of keys (the tenants' CMKs); a state directory each.
    let keys = root.join("keys");
    let a = site(root, "a", store, &keys, &policies, "");
    let b = site(root, "b", store, &keys, &policies, "");
    let mut da = Daemon::spawn(&format!("{label}-a"), &a.config, &[], &[]);
    let mut db = Daemon::spawn(&format!("{label}-b"), &b.config, &[], &[]);
    for d in [&da, &db] {
        let e = d.wait_for(0, Duration::from_secs(60), |e| {
            e["event"] == "daemon.started"
        });
        assert_eq!(e["mode"], "shared");
    }
    // At least 12 s of competing, and until every tenant has four backups
    // (slots come every 2 s; a loaded machine runs fewer of them).
    let started = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let backups = |t: &str| {
            [&da, &db]
                .iter()
                .flat_map(|d| d.events("job.finished"))
                .filter(|e| e["tenant"] == t && e["job"] == "backup" && e["outcome"] == "success")
                .count()
        };
        let enough = tenants.iter().all(|t| backups(t) >= 4);
        if started.elapsed() >= Duration::from_secs(12) && enough
            || started.elapsed() >= Duration::from_secs(120)
        {
            break;
        }
    }
    da.signal("TERM");
    db.signal("TERM");
    assert!(da.wait_exit(Duration::from_secs(70)).success());
    assert!(db.wait_exit(Duration::from_secs(70)).success());

    let mut runs: BTreeMap<(String, String, DateTime<Utc>), Vec<&str>> = BTreeMap::new();
    let ra = reports(&a.root.join("state"));
    let rb = reports(&b.root.join("state"));
    let mut by_tenant: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (who, all) in [("a", &ra), ("b", &rb)] {
        for (t, list) in all {
            for r in list {
                assert_eq!(r["outcome"], "success", "{who}: {r:#}");
                let slot = time(&r["result"]["scheduled"]["slot"]);
                runs.entry((t.clone(), r["job"].as_str().unwrap().to_owned(), slot))
                    .or_default()
                    .push(who);
                by_tenant.entry(t.clone()).or_default().push(r.clone());
            }
        }
    }
    for (key, who) in &runs {
        assert_eq!(who.len(), 1, "{key:?} ran {} times ({who:?})", who.len());
    }
    for t in tenants {
        let list = &by_tenant[t];
        let backups = list.iter().filter(|r| r["job"] == "backup").count();
        assert!(backups >= 4, "{t}: {backups} backups");
        // Never two writers of one tenant at once, across both daemons
        // (checks, readers, may run beside them). A report's times bracket
        // the lease: `started_at` is taken before it is acquired and
        // `finished_at` after it is released, so a lease handed straight
        // from one daemon to the other shows as a few milliseconds of
        // overlap; two holders at once would overlap by a whole job.
        let mut sorted: Vec<Value> = list
            .iter()
            .filter(|r| r["job"] != "check")
            .cloned()
            .collect();
        sorted.sort_by_key(|r| time(&r["started_at"]));
        for pair in sorted.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let overlap = time(&a["finished_at"]) - time(&b["started_at"]);
            let b_ran = chrono::Duration::milliseconds(b["duration_ms"].as_i64().unwrap());
            assert!(
                overlap <= chrono::Duration::zero()
                    || (overlap < chrono::Duration::milliseconds(100) && overlap < b_ran / 2),
                "{t}: overlap of {overlap}:\n{a:#}\n{b:#}"
            );
        }
    }
    // They did compete: some slots were found busy or already done.
    let competed: usize = [&da, &db]
        .iter()
        .map(|d| d.events("lease.contended").len() + d.events("job.skipped").len())
        .sum();
    assert!(competed > 0, "the daemons never met");
    let ran_a = runs.values().filter(|w| w[0] == "a").count();
    let ran_b = runs.values().filter(|w| w[0] == "b").count();
    eprintln!(
        "{label}: {} slots run, {ran_a} by a, {ran_b} by b, {competed} contended/skipped",
        runs.len()
    );
    check_all(&a.config, &tenants);
}

#[test]
fn two_daemons_over_a_shared_directory_run_each_slot_once() {
    let store = tempfile::tempdir().unwrap();
    two_daemons_share_a_store(&store.path().display().to_string(), "dir");
}

#[test]
fn two_daemons_over_s3_run_each_slot_once() {
    if std::env::var("CUSTOS_TEST_EMULATORS").as_deref() != Ok("1") {
        eprintln!("skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)");
        return;
    }
    let bucket = std::env::var("CUSTOS_TEST_S3_BUCKET").unwrap_or_else(|_| "custos-test".into());
    let prefix = format!("daemon-{}", hex::encode(custos::util::random_bytes::<6>()));
    two_daemons_share_a_store(&format!("s3://{bucket}/{prefix}"), "s3");
}

#[test]
fn a_second_daemon_on_one_state_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let s = site(root, "d", "store", &root.join("keys"), &policies, "");
    let mut first = Daemon::spawn("first", &s.config, &[], &[]);
    first.wait_for(0, Duration::from_secs(60), |e| {
        e["event"] == "daemon.started"
    });
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .arg("daemon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another custos daemon"), "{err}");
    first.signal("INT");
    assert!(first.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn sigterm_abandons_a_stuck_job_safely_and_its_slot_runs_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // A backup whose source (a command) takes far longer than the shutdown timeout.
    std::fs::write(
        policies.join("slow.toml"),
        "tenant = \"slow\"\nkey = \"local:slow\"\n\n[[sources]]\ntype = \"command\"\nname = \"dump\"\n\
         command = [\"sh\", \"-c\", \"sleep 30; echo late\"]\n\n[backup]\nschedule = \"0 2 * * *\"\n",
    )
    .unwrap();
    let keys = root.join("keys");
    let s = site(root, "d", "store", &keys, &policies, "");
    let config = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("shutdown_timeout = \"60s\"", "shutdown_timeout = \"1s\"");
    std::fs::write(&s.config, config).unwrap();

    let mut d = Daemon::spawn("stuck", &s.config, &[], &[]);
    d.wait_for(0, Duration::from_secs(60), |e| {
        e["event"] == "job.started" && e["tenant"] == "slow"
    });
    std::thread::sleep(Duration::from_millis(500));
    let stopped_at = Utc::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(15));
    let exited_at = Utc::now();
    assert!(status.success(), "{status:?}");
    assert!(exited_at - stopped_at < chrono::Duration::seconds(8));
    let abandoned = d.events("job.abandoned");
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert_eq!(abandoned[0]["tenant"], "slow");
    assert_eq!(abandoned[0]["job"], "backup");
    assert_eq!(d.events("daemon.stopped")[0]["abandoned"], 1);

    // The abandoned job's lease is left to expire, lease_ttl (10 s) after the
    // daemon's exit at the latest.
    let lease: Value = serde_json::from_slice(
        &std::fs::read(s.root.join("store/tenants/slow/locks/lease")).unwrap(),
    )
    .unwrap();
    let expires = time(&lease["expires_at"]);
    assert!(
        expires > stopped_at - chrono::Duration::seconds(1)
            && expires <= exited_at + chrono::Duration::seconds(10),
        "{lease}"
    );
    // Its slot was not recorded: the next start runs it again (here with a
    // quick source), once the lease has expired.
    let wait = (expires - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
    std::thread::sleep(wait);
    let src = source(root, "slow");
    policy(
        &policies,
        "slow",
        &src,
        "[backup]\nschedule = \"0 2 * * *\"\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .args(["daemon", "--once"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("slow    backup  success"), "{text}");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.contains("lease.takeover") || !logs.contains("lease.contended"),
        "{logs}"
    );
    check_all(&s.config, &["slow"]);
}

/// An offboarded tenant under the daemon: while a legal hold is set the shred
/// is skipped (and `shred.refused` logged) every time it is asked for; once
/// the hold is lifted the daemon shreds the tenant and a certificate lands in
/// the store; after that the shred is skipped as done.
#[test]
fn the_daemon_shreds_an_offboarded_tenant_once_its_hold_is_lifted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let src = source(root, "gone");
    let sections = |hold: bool| {
        format!(
            "[deletion]\nstate = \"offboarding\"\n\
             requested_at = \"2020-01-01T00:00:00Z\"\ngrace = \"1d\"\nlegal_hold = {hold}\n"
        )
    };
    policy(
        &policies,
        "gone",
        &src,
        "[backup]\nschedule = \"0 2 * * *\"\n",
    );
    let keys = root.join("keys");
    let s = site(root, "d", "store", &keys, &policies, "");
    let once = || {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&s.config)
            .args(["daemon", "--once", "--json"])
            .env("CUSTOS_LOG_FORMAT", "json")
            .output()
            .unwrap();
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
        });
        (
            out.status.code(),
            doc,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let outcome = |doc: &Value, job: &str| {
        doc["result"]["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["tenant"] == "gone" && r["job"] == job)
            .map(|r| {
                (
                    r["outcome"].as_str().unwrap().to_owned(),
                    r["detail"].to_string(),
                )
            })
    };
    let certificates = || -> Vec<PathBuf> {
        match std::fs::read_dir(s.root.join("store/certificates/gone")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    };

    // Active: backed up. Offboarding: no more backups, and the shred waits
    // on the hold.
    let (_, doc, _) = once();
    assert_eq!(
        outcome(&doc, "backup").map(|o| o.0).as_deref(),
        Some("success"),
        "{doc}"
    );
    policy(&policies, "gone", &src, &sections(true));
    let (code, doc, logs) = once();
    assert_eq!(code, Some(0), "{doc}\n{logs}");
    assert_eq!(outcome(&doc, "backup"), None, "{doc}");
    let (shred, detail) = outcome(&doc, "shred").expect("the shred was asked for");
    assert_eq!(shred, "skipped", "{detail}");
    assert!(detail.contains("LegalHold"), "{detail}");
    assert!(logs.contains("\"event\":\"shred.refused\""), "{logs}");
    assert!(certificates().is_empty());

    policy(&policies, "gone", &src, &sections(false));
    let (code, doc, logs) = once();
    assert_eq!(code, Some(0), "{doc}\n{logs}");
    assert_eq!(
        outcome(&doc, "shred").map(|o| o.0).as_deref(),
        Some("success"),
        "{doc}\n{logs}"
    );
    assert_eq!(certificates().len(), 1, "{:?}", certificates());
    let descriptor: Value = serde_json::from_slice(
        &std::fs::read(s.root.join("store/tenants/gone/tenant.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(descriptor["state"], "shredded");
    // Done: the slot is recorded; nothing runs again, no second certificate.
    let (code, doc, _) = once();
    assert_eq!(code, Some(0), "{doc}");
    // (A new hourly slot, if the hour turned meanwhile, is declined as
    // already shredded.)
    let again = outcome(&doc, "shred").map(|o| o.0);
    assert!(matches!(again.as_deref(), None | Some("skipped")), "{doc}");
    assert_eq!(certificates().len(), 1);
}

/// Readers run beside writers in the daemon too: with per-second schedules,
/// a scheduled drill of a tenant runs (and passes) while that tenant's long
/// backup runs. The backup's command source waits for a file the test
/// creates, so it is still running when the drill has passed, by
/// construction rather than by timing.
#[test]
fn a_scheduled_drill_runs_while_the_tenants_long_backup_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let src = source(root, "long");
    let keys = root.join("keys");
    let s = site(root, "d", "store", &keys, &policies, "");
    // A first backup by the daemon (`--once`), so the tenant has a snapshot
    // to drill and the daemon's state knows it was backed up.
    policy(
        &policies,
        "long",
        &src,
        "[backup]\nschedule = \"0 2 * * *\"\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .args(["daemon", "--once"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let release = root.join("RELEASE");
    let mut big = vec![0u8; 24 << 20];
    custos::util::fill_random(&mut big);
    let big_file = root.join("big.bin");
    std::fs::write(&big_file, &big).unwrap();
    std::fs::write(
        policies.join("long.toml"),
        format!(
            "tenant = \"long\"\nkey = \"local:long\"\n\n[[sources]]\ntype = \"path\"\nname = \"data\"\npath = \"{}\"\n\n\
             [[sources]]\ntype = \"command\"\nname = \"stream\"\n\
             command = [\"sh\", \"-c\", \"cat '{}' && while [ ! -e '{}' ] && kill -0 $PPID 2>/dev/null; do sleep 0.05; done\"]\n\n\
             [backup]\nschedule = \"* * * * * *\"\n\n[drill]\nschedule = \"* * * * * *\"\n",
            src.display(),
            big_file.display(),
            release.display()
        ),
    )
    .unwrap();

    let mut d = Daemon::spawn("long", &s.config, &[], &[]);
    let started = d.wait_for(0, Duration::from_secs(60), |e| {
        e["event"] == "job.started" && e["tenant"] == "long" && e["job"] == "backup"
    });
    let drill = d.wait_for(0, Duration::from_secs(120), |e| {
        e["event"] == "job.finished" && e["tenant"] == "long" && e["job"] == "drill"
    });
    assert_eq!(drill["outcome"], "success", "{drill}");
    assert!(
        d.events("job.finished")
            .iter()
            .all(|e| e["job"] != "backup"),
        "the backup ({started}) is still running when the drill has passed"
    );
    std::fs::write(&release, b"").unwrap();
    let backup = d.wait_for(0, Duration::from_secs(180), |e| {
        e["event"] == "job.finished" && e["tenant"] == "long" && e["job"] == "backup"
    });
    assert_eq!(backup["outcome"], "success", "{backup}");
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(60)).success());
    check_all(&s.config, &["long"]);
}

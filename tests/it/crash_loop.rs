//! Crash loops: the real `custos` binary is killed with SIGKILL at random
//! points of a job, many times, on the local store and on S3 (emulator).
//! After every kill:
//!
//! - `check --read-data` passes: no snapshot names data that is not stored,
//!   and nothing stored is corrupt;
//! - `audit verify` passes (the audit log survives a kill mid-append);
//! - the next run of the same job succeeds (once the killed run's lease
//!   has run out: the test config sets `lease_ttl = "1s"`);
//! - `prune` removes what the killed run left behind: no unreferenced pack,
//!   and on the local store no half-written staging file;
//! - a reader that restores `acme`'s latest snapshot and checks it
//!   (`--read-data`) over and over *while* each killed job runs never fails
//!   (readers run beside writers and deleters; `reader_lost`, the documented
//!   retryable kind, is counted and allowed), and in shred rounds a restore of
//!   the tenant being shredded either succeeds or fails with
//!   `tenant_unavailable` / `key_unavailable`, nothing else.
//!
//! Seeded, so a failure reproduces: `CUSTOS_CRASH_SEED=<seed printed on
//! failure>`. `CUSTOS_CRASH_LOOPS` sets the kills per job (default 10);
//! `CUSTOS_CRASH_JOBS` (e.g. `Shred,Prune`) runs only the jobs it names;
//! `scripts/crash-loop.sh` runs a large count.
//!
//! Every custos run writes index files of at most 4 blobs
//! (`CUSTOS_INDEX_FILE_BLOBS`), so a backup killed part-way has often stored
//! index files before its snapshot, as a large one does.
//!
//! Jobs covered: backup, forget, prune, rotate (a new data-key epoch and a
//! CMK rotation with re-wrap of every envelope, alternately), and shred: each
//! shred round offboards a fresh tenant; after the kill a re-run finishes the
//! shred with exactly one certificate that verifies (online: keys destroyed,
//! nothing left in the tenant's prefix), the tenant refuses a restore, and
//! the other tenant's data still checks and restores.
//!
//! The shred case also runs on a PKCS#11 tenant (a SoftHSM2 token, or the
//! HSM the `CUSTOS_TEST_PKCS11_*` variables name; a failure, never a skip,
//! under `CUSTOS_TEST_EMULATORS=1`): each round's tenant has a key of two
//! versions on the token; the shred is killed at each named point of the
//! PKCS#11 destruction (`CUSTOS_CRASH_AT=pkcs11-destroy:…`), after the keys
//! step (`shred:keys`) and at a few seeded random points
//! (`CUSTOS_CRASH_LOOPS`, default 3 here). After each, on top of the shred
//! invariants above: the key shows destroyed on the token, and the
//! certificate states when destruction began (before the kill) and when it
//! became irreversible (when the re-run destroyed the last version). Another
//! tenant's key, disabled, stays on the token throughout: after a kill
//! between a version's `C_DestroyObject` and its local record
//! (`pkcs11-destroy:unrecorded`, or a seeded kill landing there) the re-run
//! must refuse, naming only keys of others that give no check value; once
//! they can encrypt it finishes (the remedy docs/keys-you-hold.md gives).
//!
//! And `rotate --cmk` of a fresh tenant on the local key provider, killed at
//! each named point of the key file write (`CUSTOS_CRASH_AT=local-key:…`)
//! and at seeded random points, then shredded: after the shred no file of
//! the tenant's key but its tombstone is left in the key directory (no
//! temporary file with key material, no key file) and its certificate
//! verifies online.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Cli, Run};

/// A small seeded generator (splitmix64): the same seed, the same kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn loops() -> usize {
    loops_or(10)
}

/// `CUSTOS_CRASH_LOOPS`, else `default`.
fn loops_or(default: usize) -> usize {
    std::env::var("CUSTOS_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("CUSTOS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Job {
    Backup,
    Forget,
    Prune,
    /// `rotate --new-epoch`.
    NewEpoch,
    /// `rotate --cmk`: a new key version, then every envelope re-wrapped.
    RotateCmk,
    /// `shred <tenant> --confirm <tenant>` of a fresh tenant each round.
    Shred,
    /// `rotate <tenant> --cmk` of a fresh tenant each round (local key),
    /// killed, then the tenant shredded.
    RotateThenShred,
}

impl Job {
    /// The command line; `shred_tenant` is the tenant a shred round targets.
    fn args(self, shred_tenant: &str) -> Vec<String> {
        let v: Vec<&str> = match self {
            Job::Backup => vec!["backup", "acme"],
            Job::Forget => vec!["forget", "acme", "--keep-last", "2"],
            Job::Prune => vec!["prune", "acme"],
            Job::NewEpoch => vec!["rotate", "acme", "--new-epoch"],
            Job::RotateCmk => vec!["rotate", "acme", "--cmk"],
            Job::Shred => vec!["shred", shred_tenant, "--confirm", shred_tenant],
            Job::RotateThenShred => vec!["rotate", shred_tenant, "--cmk"],
        };
        v.into_iter().map(str::to_owned).collect()
    }
}

/// One crash-loop campaign on one store.
struct Campaign {
    cli: Cli,
    data: std::path::PathBuf,
    rng: Rng,
    seed: u64,
    local: bool,
    /// Extra environment for every run (the AWS_* variables for S3).
    envs: Vec<(String, String)>,
    /// Figures for the report line.
    kills: usize,
    finished_before_kill: usize,
    jobs: usize,
    /// The tenant the current shred round offboards (a fresh one each round).
    shred_tenant: String,
    shred_rounds: usize,
    /// Rounds of `rotate --cmk` killed then shredded, and those killed at a
    /// named crash point.
    rotate_shred_rounds: usize,
    named_point_kills: usize,
    /// Re-runs of a PKCS#11 shred refused because a version's destruction
    /// was not yet recorded locally when it was killed and the token held
    /// keys that give no check value; each then finished after the remedy.
    unchecked_refusals: usize,
    /// Kills of `rotate --cmk` after which a temporary key file was found.
    kills_leaving_key_material: usize,
    readers: ReaderStats,
    /// Seeded kills per job.
    loops: usize,
    /// Shred tenants' keys on this PKCS#11 token instead of local keys.
    pkcs11: Option<Pkcs11Token>,
    /// The key of the current shred round's tenant.
    shred_key: String,
}

/// The token of the PKCS#11 shred case.
struct Pkcs11Token {
    settings: custos::keys::pkcs11::Pkcs11Settings,
    label: String,
}

/// What the reader beside the killed jobs did.
#[derive(Debug, Default)]
struct ReaderStats {
    restores: usize,
    checks: usize,
    /// Restores of a tenant being shredded, cut off cleanly.
    cut_off: usize,
    /// `reader_lost` (retryable): allowed, counted.
    lost: usize,
}

/// Restores and checks `acme` until `stop`, and restores `shredding` (a tenant
/// being shredded) when given; panics on the first failure that is not
/// allowed. Runs beside a job that is about to be killed.
fn reader_loop(
    config: &Path,
    envs: &[(String, String)],
    scratch: &Path,
    shredding: Option<&str>,
    stop: &AtomicBool,
    context: &str,
) -> ReaderStats {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(config)
            .args(args)
            .arg("--json")
            .env("CUSTOS_LOG", "error")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run custos");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{context}: reader custos {args:?} printed no JSON ({e}, exit {:?}):\n{}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let kind = doc["error"]["kind"].as_str().map(str::to_owned);
        (out.status.code(), kind, doc)
    };
    let mut stats = ReaderStats::default();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let target = scratch.join(format!("reader-{i}"));
        let t = target.to_str().unwrap();
        match run(&["restore", "acme", "latest", "--target", t]) {
            (Some(0), _, _) => stats.restores += 1,
            (_, Some(k), _) if k == "reader_lost" => stats.lost += 1,
            (code, _, doc) => {
                panic!("{context}: a restore beside the job failed ({code:?}): {doc}")
            }
        }
        let _ = fs::remove_dir_all(&target);
        match run(&["check", "acme", "--read-data"]) {
            (Some(0), _, doc) if doc["result"]["faults"] == serde_json::json!([]) => {
                stats.checks += 1
            }
            (_, Some(k), _) if k == "reader_lost" => stats.lost += 1,
            (code, _, doc) => panic!("{context}: a check beside the job failed ({code:?}): {doc}"),
        }
        if let Some(gone) = shredding {
            let target = scratch.join(format!("reader-{i}-{gone}"));
            match run(&[
                "restore",
                gone,
                "latest",
                "--target",
                target.to_str().unwrap(),
            ]) {
                (Some(0), _, _) => stats.restores += 1,
                (Some(1), Some(k), _)
                    if k == "tenant_unavailable"
                        || k == "key_unavailable"
                        || k == "reader_lost" =>
                {
                    stats.cut_off += 1
                }
                (code, _, doc) => panic!(
                    "{context}: a restore of {gone} beside its shred failed otherwise ({code:?}): {doc}"
                ),
            }
            let _ = fs::remove_dir_all(&target);
        }
    }
    stats
}

impl Campaign {
    fn new(seed: u64, store: Option<String>, pkcs11: Option<Pkcs11Token>) -> Campaign {
        let cli = Cli::new();
        let d = cli.path().to_owned();
        let local = store.is_none();
        let store = store.unwrap_or_else(|| format!("file://{}/store", d.display()));
        let pkcs11_section = match &pkcs11 {
            None => String::new(),
            Some(t) => {
                let custos::keys::pkcs11::PinSource::File(pin) = &t.settings.pin else {
                    panic!("the test token's PIN is in a file")
                };
                format!(
                    "[pkcs11]\nmodule = \"{}\"\npin_file = \"{}\"\ntimeout = \"20s\"\n",
                    t.settings.module.display(),
                    pin.display()
                )
            }
        };
        fs::write(
            d.join("custos.toml"),
            format!(
                "store = \"{store}\"\nstate_dir = \"{0}/state\"\npolicies_dir = \"{0}/policies\"\n[local_keys]\ndir = \"{0}/keys\"\n[daemon]\nlease_ttl = \"1s\"\n{pkcs11_section}",
                d.display()
            ),
        )
        .unwrap();
        let data = d.join("data");
        fs::create_dir_all(data.join("sub")).unwrap();
        fs::write(
            d.join("policies/acme.toml"),
            format!(
                "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[backup]\npack_size = \"4MiB\"\n[retention]\nkeep_last = 2\n",
                data.display()
            ),
        )
        .unwrap();
        let mut c = Campaign {
            cli,
            data,
            rng: Rng(seed),
            seed,
            local,
            envs: [(
                // Index files of a few blobs: backups and prunes of a few
                // blobs write them along the way, as ones of millions do.
                "CUSTOS_INDEX_FILE_BLOBS".to_owned(),
                "4".to_owned(),
            )]
            .into_iter()
            .chain(if local { Vec::new() } else { common::aws_env() })
            .collect(),
            kills: 0,
            finished_before_kill: 0,
            jobs: 0,
            shred_tenant: String::new(),
            shred_rounds: 0,
            rotate_shred_rounds: 0,
            named_point_kills: 0,
            unchecked_refusals: 0,
            kills_leaving_key_material: 0,
            readers: ReaderStats::default(),
            loops: loops(),
            pkcs11,
            shred_key: String::new(),
        };
        for _ in 0..3 {
            c.mutate();
        }
        c.ok(&["backup", "acme"]);
        c
    }

    /// Changes the source: a new file of 1–6 MiB (some of it compressible),
    /// small files, and sometimes a file removed (so prune has work).
    fn mutate(&mut self) {
        let n = self.rng.next();
        let size = (1 << 20) + self.rng.below(5 << 20) as usize;
        let mut body = self.rng.bytes(size);
        let half = size / 2;
        body[..half].fill(b'x');
        fs::write(self.data.join(format!("f-{n:016x}")), body).unwrap();
        for i in 0..5 {
            fs::write(
                self.data.join(format!("sub/s-{n:016x}-{i}")),
                format!("{n} {i}"),
            )
            .unwrap();
        }
        let mut files: Vec<_> = fs::read_dir(&self.data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort(); // directory order is not reproducible; the seed must be
        if files.len() > 4 {
            let victim = &files[self.rng.below(files.len() as u64) as usize];
            fs::remove_file(victim).unwrap();
        }
    }

    fn context(&self, what: &str) -> String {
        format!(
            "{what} (reproduce with CUSTOS_CRASH_SEED={} CUSTOS_CRASH_LOOPS={})",
            self.seed, self.loops
        )
    }

    fn ok(&mut self, args: &[&str]) -> Run {
        let r = self.settled(args);
        assert_eq!(
            r.code,
            0,
            "{}:\n{}\n{}",
            self.context(&format!("custos {args:?} failed")),
            r.stdout,
            r.stderr
        );
        r
    }

    /// Runs a command; while a killed run's lease is still live, waits and retries.
    fn settled(&mut self, args: &[&str]) -> Run {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let envs: Vec<(&str, &str)> = self
                .envs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = self.cli.run_env(args, &envs);
            self.jobs += 1;
            if r.code != 0 && r.stderr.contains("is busy") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(300));
                continue;
            }
            return r;
        }
    }

    /// Starts `args`, kills it with SIGKILL after `delay` if still running,
    /// with a reader restoring and checking beside it the whole time.
    /// Returns true if it was killed.
    fn run_and_kill(&mut self, args: &[&str], delay: Duration, job: Job) -> bool {
        let config: PathBuf = self.cli.path().join("custos.toml");
        let scratch = self.cli.path().join("reader-scratch");
        fs::create_dir_all(&scratch).unwrap();
        let envs = self.envs.clone();
        let shredding = (job == Job::Shred).then(|| self.shred_tenant.clone());
        let context = self.context(&format!("{job:?} with a reader beside it"));
        let stop = AtomicBool::new(false);
        let (killed, stats) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                reader_loop(
                    &config,
                    &envs,
                    &scratch,
                    shredding.as_deref(),
                    &stop,
                    &context,
                )
            });
            let killed = self.kill_after(args, delay);
            stop.store(true, Ordering::SeqCst);
            (killed, reader.join())
        });
        let stats = stats.unwrap_or_else(|e| std::panic::resume_unwind(e));
        self.readers.restores += stats.restores;
        self.readers.checks += stats.checks;
        self.readers.cut_off += stats.cut_off;
        self.readers.lost += stats.lost;
        killed
    }

    fn kill_after(&mut self, args: &[&str], delay: Duration) -> bool {
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(self.cli.path().join("custos.toml"))
            .args(args)
            .env("CUSTOS_LOG", "warn")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start custos");
        self.jobs += 1;
        let end = Instant::now() + delay;
        while Instant::now() < end {
            if child.try_wait().unwrap().is_some() {
                self.finished_before_kill += 1;
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap(); // SIGKILL
            self.kills += 1;
        } else {
            self.finished_before_kill += 1;
        }
        child.wait().unwrap();
        killed
    }

    /// How long an uninterrupted run of `job` takes (kills are drawn below it).
    fn timed(&mut self, job: Job) -> Duration {
        self.prepare(job);
        let t = Instant::now();
        self.ok_job(job);
        t.elapsed()
    }

    fn job_args(&self, job: Job) -> Vec<String> {
        job.args(&self.shred_tenant)
    }

    fn ok_job(&mut self, job: Job) -> Run {
        let args = self.job_args(job);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args)
    }

    /// Re-runs the shred. On a token, one killed after a version's
    /// `C_DestroyObject` and before its local record refuses while the token
    /// holds keys that give no check value (the fail-safe of
    /// docs/keys-you-hold.md); the operator's remedy follows: those keys
    /// (other tenants', never this one's) are let encrypt, the shred runs
    /// again and finishes, and they are disabled again.
    fn finish_shred(&mut self, what: &str) {
        let args = self.job_args(Job::Shred);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = self.settled(&args);
        if r.code == 0 {
            return;
        }
        let Some((settings, token)) = self
            .pkcs11
            .as_ref()
            .map(|t| (t.settings.clone(), t.label.clone()))
        else {
            if let Ok(keep) = std::env::var("CUSTOS_CRASH_KEEP") {
                let _ = Command::new("cp")
                    .arg("-a")
                    .arg(self.cli.path())
                    .arg(&keep)
                    .status();
            }
            panic!(
                "{}:\n{}",
                self.context(&format!("shred after {what}")),
                r.stderr
            );
        };
        let unchecked = unchecked_keys(&r.stderr).unwrap_or_else(|| {
            panic!(
                "{}:\n{}",
                self.context(&format!("shred after {what}")),
                r.stderr
            )
        });
        let own = self.shred_key.rsplit("object=").next().unwrap().to_owned();
        assert!(
            unchecked.iter().all(|(label, _)| *label != own),
            "{}: {unchecked:?}",
            self.context(&format!("keys named by the refused shred after {what}"))
        );
        self.unchecked_refusals += 1;
        let set = |encrypt: bool| {
            common::on_token(&settings, &token, |s| {
                for (label, id) in &unchecked {
                    let h = common::version_handle(s, label, *id);
                    s.update_attributes(h, &[cryptoki::object::Attribute::Encrypt(encrypt)])
                        .unwrap();
                }
            })
        };
        set(true);
        let r = self.settled(&args);
        set(false);
        assert_eq!(
            r.code,
            0,
            "{}:\n{}",
            self.context(&format!(
                "shred after {what}, its refusal's named keys let encrypt"
            )),
            r.stderr
        );
    }

    /// Gives the job something to do.
    fn prepare(&mut self, job: Job) {
        match job {
            Job::Backup => self.mutate(),
            Job::NewEpoch | Job::RotateCmk => {
                self.mutate();
                self.ok(&["backup", "acme"]);
            }
            Job::Forget | Job::Prune => {
                self.mutate();
                self.ok(&["backup", "acme"]);
                self.mutate();
                self.ok(&["backup", "acme"]);
                if job == Job::Prune {
                    self.ok(&["forget", "acme", "--keep-last", "1"]);
                }
            }
            Job::Shred | Job::RotateThenShred => {
                // A fresh tenant with a few snapshots and two epochs.
                let t = if job == Job::Shred {
                    self.shred_rounds += 1;
                    format!("gone{}", self.shred_rounds)
                } else {
                    self.rotate_shred_rounds += 1;
                    format!("rot{}", self.rotate_shred_rounds)
                };
                let d = self.cli.path().join(&t);
                fs::create_dir_all(&d).unwrap();
                for i in 0..3 {
                    let len = (256 << 10) + self.rng.below(1 << 20) as usize;
                    let body = self.rng.bytes(len);
                    fs::write(d.join(format!("f{i}")), body).unwrap();
                }
                let key = match (&self.pkcs11, job) {
                    (Some(token), Job::Shred) => common::pkcs11_key(&token.label, &t).to_string(),
                    _ => format!("local:{t}"),
                };
                fs::write(
                    self.cli.path().join(format!("policies/{t}.toml")),
                    format!(
                        "tenant = \"{t}\"\nkey = \"{key}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n",
                        d.display()
                    ),
                )
                .unwrap();
                if key.starts_with("pkcs11:") {
                    // The object made on the token, then a second version,
                    // so that a kill can fall between two C_DestroyObject.
                    self.ok(&["tenant", "init", &t, "--key", &key, "--create-key"]);
                    self.ok(&["backup", &t]);
                    self.ok(&["rotate", &t, "--cmk"]);
                } else {
                    self.ok(&["backup", &t]);
                }
                self.ok(&["rotate", &t, "--new-epoch"]);
                self.ok(&["backup", &t]);
                self.shred_tenant = t;
                self.shred_key = key;
            }
        }
    }

    /// The invariants after a shred was killed: the re-run finishes it, with
    /// one certificate that verifies offline and online, and the other
    /// tenant is intact. With `killed`, the kill's time and whether the key
    /// destruction was cut short by it: the certificate must then say that
    /// destruction began before the kill and completed after it.
    fn verify_shred(&mut self, what: &str) {
        self.verify_shred_times(what, None)
    }

    fn verify_shred_times(
        &mut self,
        what: &str,
        killed: Option<(chrono::DateTime<chrono::Utc>, bool)>,
    ) {
        let t = self.shred_tenant.clone();
        let rerun_at = chrono::Utc::now();
        let audit = self.settled(&["audit", "verify"]);
        assert_eq!(
            audit.code,
            0,
            "{}:\n{}",
            self.context(&format!("audit verify after {what}")),
            audit.stderr
        );
        self.finish_shred(what);
        let ids = self.ok(&["certificate", "get", &t]);
        let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
        assert_eq!(
            ids.len(),
            1,
            "{}: {ids:?}",
            self.context(&format!("certificates of {t} after {what}"))
        );
        let file = self.cli.path().join(format!("{t}.certificate.json"));
        self.ok(&[
            "certificate",
            "get",
            &t,
            ids[0],
            "--out",
            file.to_str().unwrap(),
        ]);
        self.ok(&["certificate", "verify", file.to_str().unwrap()]);
        self.ok(&["certificate", "verify", file.to_str().unwrap(), "--online"]);
        let cert: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        let guarantee = &cert["certificate"]["guarantee"];
        let time = |field: &str| {
            guarantee[field]
                .as_str()
                .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
                .map(|v| v.with_timezone(&chrono::Utc))
                .unwrap_or_else(|| {
                    panic!(
                        "{}: {guarantee}",
                        self.context(&format!("guarantee.{field} of {t} after {what}"))
                    )
                })
        };
        let (began, irreversible) = (time("destruction_began_at"), time("irreversible_at"));
        assert!(
            began <= irreversible,
            "{}: {guarantee}",
            self.context(&format!("destruction times of {t} after {what}"))
        );
        if let Some((killed_at, cut_short)) = killed {
            assert!(
                began <= killed_at,
                "{}: {guarantee}",
                self.context(&format!(
                    "destruction of {t} began before the kill ({what})"
                ))
            );
            if cut_short {
                assert!(
                    irreversible >= rerun_at,
                    "{}: re-run at {rerun_at}, {guarantee}",
                    self.context(&format!(
                        "irreversible_at of {t}: when the re-run destroyed the last version ({what})"
                    ))
                );
            }
        }
        if let Some(token) = &self.pkcs11 {
            self.assert_destroyed_on_token(token, what);
        }
        let target = self.cli.path().join("restored-gone");
        let r = self.settled(&[
            "restore",
            &t,
            "latest",
            "--target",
            target.to_str().unwrap(),
        ]);
        assert_ne!(
            r.code,
            0,
            "{}",
            self.context(&format!("restore of shredded {t} after {what}"))
        );
        self.ok(&["check", "acme", "--read-data"]);
        self.restore_other();
    }

    /// `acme`'s latest snapshot restores, whole.
    fn restore_other(&mut self) {
        let target = self.cli.path().join("restored");
        let _ = fs::remove_dir_all(&target);
        self.ok(&[
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ]);
        fs::remove_dir_all(&target).unwrap();
    }

    /// The shredded tenant's key, as the token itself shows it: destroyed
    /// (the destruction record, no version object left).
    fn assert_destroyed_on_token(&self, token: &Pkcs11Token, what: &str) {
        use custos::keys::KeyProvider;
        let key = custos::keys::KeyRef::parse(&self.shred_key).unwrap();
        let provider = custos::keys::pkcs11::Pkcs11Provider::open(&token.settings).unwrap();
        let info = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(provider.describe(&key))
            .unwrap_or_else(|e| panic!("{}: {e}", self.context(&format!("describe {key}"))));
        assert!(
            matches!(info.state, custos::keys::KeyState::Destroyed { .. })
                && info.current_version.is_none(),
            "{}: {info:?}",
            self.context(&format!("{key} on the token after {what}"))
        );
    }

    /// The PKCS#11 shred case: killed at each named point of the key's
    /// destruction and after the keys step, then at seeded random points.
    fn pkcs11_shred_campaign(&mut self) {
        let points = custos::jobs::shred::hook::PKCS11_DESTROY_POINTS
            .iter()
            .map(|p| (format!("pkcs11-destroy:{p}"), true))
            .chain([("shred:keys".to_owned(), false)]);
        for (point, cut_short) in points {
            let refusals = self.unchecked_refusals;
            self.prepare(Job::Shred);
            let args = self.job_args(Job::Shred);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = self
                .cli
                .run_env(&args, &[("CUSTOS_CRASH_AT", point.as_str())]);
            let killed_at = chrono::Utc::now();
            self.jobs += 1;
            assert!(
                r.stderr.contains("aborting here"),
                "{}: {}",
                self.context(&format!("shred did not reach {point}")),
                r.stderr
            );
            self.kills += 1;
            self.named_point_kills += 1;
            // A clock tick between the kill and the re-run, so that the
            // certificate's times tell the two runs apart.
            std::thread::sleep(Duration::from_millis(1100));
            self.verify_shred_times(
                &format!("Shred killed at {point}"),
                Some((killed_at, cut_short)),
            );
            // The suspended key gives no check value: the fail-safe, then the remedy.
            if point == "pkcs11-destroy:unrecorded" {
                assert_eq!(
                    self.unchecked_refusals,
                    refusals + 1,
                    "{}",
                    self.context("the re-run after pkcs11-destroy:unrecorded was not refused")
                );
            }
        }
        self.campaign(Job::Shred);
    }

    /// The invariants after a `rotate --cmk` was killed and before and after
    /// the shred that follows: the tenant still checks (every envelope
    /// unwraps under some version of its key), the shred succeeds, and then
    /// nothing of its key is left in the key directory but the tombstone,
    /// and its certificate verifies online (which looks for leftovers).
    fn verify_rotate_then_shred(&mut self, what: &str) {
        let t = self.shred_tenant.clone();
        let keys = self.cli.path().join("keys");
        // Before any custos command (each start sweeps): did the kill leave
        // a temporary file of the key?
        let leftover = fs::read_dir(&keys).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&format!(".{t}."))
        });
        if leftover {
            self.kills_leaving_key_material += 1;
        }
        let audit = self.settled(&["audit", "verify"]);
        assert_eq!(
            audit.code,
            0,
            "{}:\n{}",
            self.context(&format!("audit verify after {what}")),
            audit.stderr
        );
        self.ok(&["check", &t, "--read-data"]);
        self.ok(&["shred", &t, "--confirm", &t]);
        let mut left: Vec<String> = fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(&format!("{t}.")) || n.starts_with(&format!(".{t}.")))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [format!("{t}.destroyed")],
            "{}",
            self.context(&format!("files of local:{t} after {what} and a shred"))
        );
        let ids = self.ok(&["certificate", "get", &t]);
        let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
        assert_eq!(
            ids.len(),
            1,
            "{}: {ids:?}",
            self.context(&format!("certificates of {t}"))
        );
        let file = self.cli.path().join(format!("{t}.certificate.json"));
        self.ok(&[
            "certificate",
            "get",
            &t,
            ids[0],
            "--out",
            file.to_str().unwrap(),
        ]);
        self.ok(&["certificate", "verify", file.to_str().unwrap(), "--online"]);
        self.ok(&["check", "acme", "--read-data"]);
    }

    /// The invariants after a kill (or a run that finished first).
    fn verify(&mut self, job: Job, what: &str) {
        if job == Job::Shred {
            return self.verify_shred(what);
        }
        if job == Job::RotateThenShred {
            return self.verify_rotate_then_shred(what);
        }
        let check = self.settled(&["check", "acme", "--read-data", "--json"]);
        assert_eq!(
            check.code,
            0,
            "{}:\n{}\n{}",
            self.context(&format!("check --read-data after {what}")),
            check.stdout,
            check.stderr
        );
        let audit = self.settled(&["audit", "verify"]);
        assert_eq!(
            audit.code,
            0,
            "{}:\n{}\n{}",
            self.context(&format!("audit verify after {what}")),
            audit.stdout,
            audit.stderr
        );
        // The next run of the same job succeeds.
        self.ok_job(job);
        // Prune removes what the killed run left behind.
        self.ok(&["prune", "acme"]);
        let check = self.ok(&["check", "acme", "--read-data", "--json"]);
        let result = &check.json()["result"];
        assert_eq!(
            result["unreferenced_packs"],
            0,
            "{}: {result}",
            self.context(&format!("leftover packs after {what} and prune"))
        );
        if self.local {
            let staging = staging_files(&self.cli.store().join("tenants"));
            assert!(
                staging.is_empty(),
                "{}: {staging:?}",
                self.context(&format!("staging files left after {what} and prune"))
            );
        }
        // Every snapshot still restores (the latest one, whole).
        self.restore_other();
    }

    fn campaign(&mut self, job: Job) {
        if job == Job::RotateThenShred {
            // Each named point of the key file write, once.
            for point in custos::jobs::shred::hook::LOCAL_KEY_POINTS {
                self.prepare(job);
                let args = self.job_args(job);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut envs = self.envs.clone();
                envs.push(("CUSTOS_CRASH_AT".into(), format!("local-key:{point}")));
                let envs: Vec<(&str, &str)> =
                    envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let r = self.cli.run_env(&args, &envs);
                self.jobs += 1;
                assert!(
                    r.stderr.contains("aborting here"),
                    "{}: {}",
                    self.context(&format!("rotate --cmk did not reach local-key:{point}")),
                    r.stderr
                );
                self.kills += 1;
                self.named_point_kills += 1;
                self.verify(job, &format!("{job:?} killed at local-key:{point}"));
            }
        }
        let typical = self.timed(job);
        if job == Job::RotateThenShred {
            self.verify(job, "an uninterrupted rotate --cmk");
        }
        // Kill points from process start to a little past a typical run.
        let span = (typical.as_millis() as u64 * 6 / 5).max(50);
        for i in 0..self.loops {
            self.prepare(job);
            let delay = Duration::from_millis(self.rng.below(span));
            let args = self.job_args(job);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let killed = self.run_and_kill(&args, delay, job);
            let what = format!(
                "{job:?} #{i} {} at {} ms",
                if killed { "killed" } else { "finished" },
                delay.as_millis()
            );
            self.verify(job, &what);
        }
    }

    fn report(&self, store: &str) {
        let r = &self.readers;
        eprintln!(
            "crash loop on {store}: seed {}, {} kills ({} at named points), {} runs finished before their kill point, {} custos runs, {} tenants shredded, {} rotate --cmk rounds then shredded ({} kills left a temporary key file), {} shred re-runs refused beside keys that give no check value; \
             beside the killed jobs: {} restores, {} checks --read-data, {} restores cut off by a shred, {} reader_lost; faults found: 0",
            self.seed,
            self.kills,
            self.named_point_kills,
            self.finished_before_kill,
            self.jobs,
            self.shred_rounds,
            self.rotate_shred_rounds,
            self.kills_leaving_key_material,
            self.unchecked_refusals,
            r.restores,
            r.checks,
            r.cut_off,
            r.lost
        );
    }
}

/// Half-written objects of the local store (`<name>#<n>`, object_store's
/// staging files, invisible to listing).
fn staging_files(root: &Path) -> Vec<String> {
    common::files_under(root)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|name| name.rsplit_once('#'))
                .is_some_and(|(_, n)| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|p| p.display().to_string())
        .collect()
}

fn run_all(store: Option<String>, name: &str) {
    let seed = seed();
    eprintln!("crash loop on {name}: seed {seed}");
    let mut c = Campaign::new(seed, store, None);
    let only = std::env::var("CUSTOS_CRASH_JOBS").ok();
    for job in [
        Job::Backup,
        Job::Forget,
        Job::Prune,
        Job::NewEpoch,
        Job::RotateCmk,
        Job::Shred,
        Job::RotateThenShred,
    ] {
        if only
            .as_deref()
            .is_none_or(|names| names.split(',').any(|n| n.trim() == format!("{job:?}")))
        {
            c.campaign(job);
        }
    }
    c.report(name);
}

#[test]
fn crash_loop_local_store() {
    run_all(None, "the local store");
}

#[test]
fn crash_loop_s3() {
    if !common::require(
        std::env::var("CUSTOS_TEST_EMULATORS").is_ok_and(|v| v == "1"),
        "the S3 emulator",
    ) {
        return;
    }
    let bucket = std::env::var("CUSTOS_TEST_S3_BUCKET").unwrap_or_else(|_| "custos-test".into());
    // Unique per run: a rerun with the same seed must not meet the tenants
    // (and local keys) of an earlier, interrupted run in the same bucket.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("crash-{:016x}-{nanos:x}", seed());
    run_all(Some(format!("s3://{bucket}/{prefix}")), "S3");
}

/// The shred case on a PKCS#11 tenant (SoftHSM2 under scripts/test.sh).
#[test]
fn crash_loop_pkcs11_shred() {
    let Some((settings, label)) = common::pkcs11_settings() else {
        return;
    };
    let _alone = common::pkcs11_alone();
    let seed = seed();
    eprintln!("crash loop on a PKCS#11 token: seed {seed}");
    // Another tenant's key, disabled, on the token throughout: it gives no
    // check value, so a shred killed before it recorded a version's
    // destruction refuses to finish beside it until it can encrypt.
    let suspended = SuspendedKey::new(&settings, &label);
    let mut c = Campaign::new(seed, None, Some(Pkcs11Token { settings, label }));
    // Each round makes a tenant with a two-version key: a few seeded kills
    // keep the case within the CI budget.
    c.loops = loops_or(3);
    c.pkcs11_shred_campaign();
    c.report("a PKCS#11 token (shred)");
    suspended.remove();
}

/// A disabled key of a tenant outside the campaign.
struct SuspendedKey {
    provider: custos::keys::pkcs11::Pkcs11Provider,
    key: custos::keys::KeyRef,
    rt: tokio::runtime::Runtime,
}

impl SuspendedKey {
    fn new(settings: &custos::keys::pkcs11::Pkcs11Settings, token: &str) -> SuspendedKey {
        use custos::keys::KeyProvider;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let provider = custos::keys::pkcs11::Pkcs11Provider::open(settings).unwrap();
        let key = common::pkcs11_key(token, "suspended");
        rt.block_on(async {
            provider.create_key(&key).await.unwrap();
            provider.disable(&key).await.unwrap();
        });
        SuspendedKey { provider, key, rt }
    }

    /// Disabled still (the remedy disabled it again), then destroyed.
    fn remove(self) {
        use custos::keys::KeyProvider;
        self.rt.block_on(async {
            let info = self.provider.describe(&self.key).await.unwrap();
            assert!(
                matches!(info.state, custos::keys::KeyState::Disabled),
                "{info:?}"
            );
            self.provider.destroy(&self.key, 7).await.unwrap();
        });
    }
}

/// The keys a shred's refusal names as giving no check value: (label,
/// `CKA_ID`), or `None` when the error is another.
fn unchecked_keys(stderr: &str) -> Option<Vec<(String, u32)>> {
    let line = stderr.lines().find(|l| l.starts_with("error: "))?;
    let (_, named) = line.split_once("so one of them may hold such a version: ")?;
    let (named, _) = named.split_once(". Check each of them")?;
    named
        .split(", ")
        .map(|name| {
            let field = |f: &str| {
                name.split(';')
                    .find_map(|p| p.strip_prefix(f))
                    .map(str::to_owned)
            };
            let id = u32::from_str_radix(&field("id=")?, 16).ok()?;
            Some((field("object=")?, id))
        })
        .collect()
}

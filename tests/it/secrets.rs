//! No key bytes anywhere they could leak: logs (at the most verbose level,
//! text and JSON), errors, `Debug` output, job reports, the state directory,
//! the store, temporary files. The test knows two secrets: the local CMK
//! material (from the key file) and the tenant data key (unwrapped from the
//! envelope through the library), and greps for each raw, in hex (both
//! cases) and in base64 (standard and URL-safe, with and without padding).
//!
//! Also: permissions like ssh's StrictModes (a `custos.toml`, key, state or
//! policies directory or file that another local user could write is
//! refused; key files must be 0600), and no key material left behind by an
//! interrupted key write once the key is shredded.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::Cli;
use base64::Engine;

/// Every encoding of a secret the test looks for.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut v = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
    ];
    for e in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
        v.push(e.encode(secret).into_bytes());
    }
    // A prefix is enough to leak most of a key: look for the first 16 bytes too.
    v.push(secret[..16].to_vec());
    v.push(hex::encode(&secret[..16]).into_bytes());
    v
}

fn find(haystack: &[u8], needles: &[Vec<u8>]) -> Option<usize> {
    needles
        .iter()
        .position(|n| haystack.windows(n.len()).any(|w| w == n.as_slice()))
}

/// Files under `root`; in the temp dir only what custos puts there
/// (`custos-*` entries such as drill scratch directories).
fn files_of(root: &Path, custos_only: bool) -> Vec<std::path::PathBuf> {
    if !custos_only {
        return files(root);
    }
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("custos-"))
        })
        .flat_map(|p| if p.is_dir() { files(&p) } else { vec![p] })
        .collect()
}

fn files(root: &Path) -> Vec<std::path::PathBuf> {
    common::files_under(root)
        .into_iter()
        .filter(|p| p.is_file())
        .collect()
}

#[test]
fn no_key_bytes_in_logs_reports_state_store_or_debug_output() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 5);
    cli.policy("acme", &data);
    let mut transcript: Vec<u8> = Vec::new();
    let mut run = |args: &[&str], format: &str| {
        let r = cli.run_env(
            args,
            &[("CUSTOS_LOG", "trace"), ("CUSTOS_LOG_FORMAT", format)],
        );
        transcript.extend_from_slice(r.stdout.as_bytes());
        transcript.extend_from_slice(r.stderr.as_bytes());
        r
    };
    let target = cli.path().join("restored");
    let t = target.to_str().unwrap();
    for format in ["json", "text"] {
        for args in [
            vec!["backup", "acme", "--json"],
            vec!["backup", "acme"],
            vec!["snapshots", "acme", "--json"],
            vec!["check", "acme", "--read-data", "--json"],
            vec!["restore", "acme", "latest", "--target", t, "--overwrite"],
            vec!["drill", "acme", "--json"],
            vec!["drill", "history", "acme"],
            vec!["forget", "acme", "--keep-last", "1", "--json"],
            vec!["prune", "acme", "--json"],
            vec!["rotate", "acme", "--new-epoch", "--json"],
            vec!["rotate", "acme", "--cmk", "--json"],
            vec!["tenant", "show", "acme", "--json"],
            vec!["tenant", "list"],
            vec!["audit", "show", "--json"],
            vec!["audit", "verify"],
        ] {
            run(&args, format);
        }
    }
    // Failures too: a tampered envelope, a wrong key, a missing object.
    let env_path = cli.store().join("tenants/acme/keys/1");
    let saved = fs::read(&env_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    v["wrapped"]["ciphertext"] = "AAAA".into();
    fs::write(&env_path, serde_json::to_vec(&v).unwrap()).unwrap();
    run(&["check", "acme", "--json"], "json");
    run(
        &["restore", "acme", "latest", "--target", t, "--overwrite"],
        "text",
    );
    fs::write(&env_path, &saved).unwrap();

    // The secrets.
    let key_file: serde_json::Value =
        serde_json::from_slice(&fs::read(cli.path().join("keys/acme.key")).unwrap()).unwrap();
    let cmk_versions: Vec<Vec<u8>> = key_file["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v["material"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert!(cmk_versions.len() >= 2, "rotate --cmk added a version");
    let (data_keys, debug_text) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ctx = custos::context::Context::embedded(cli.path()).unwrap();
        let repo = custos::repo::Repo::open(&ctx, &custos::TenantId::new("acme").unwrap(), None)
            .await
            .unwrap();
        let mut keys = Vec::new();
        let mut debug = format!("{ctx:?} {repo:?}");
        for e in repo.descriptor().live_epochs() {
            let k = repo.epoch_keys(e.epoch).await.unwrap();
            keys.push(k.tdk().expose().to_vec());
            debug.push_str(&format!("{k:?} {:?} {:#?}", k.tdk(), k.chunk_id_key()));
        }
        let env = repo.load_envelope(1).await.unwrap();
        debug.push_str(&format!("{env:?} {:#?}", repo.descriptor()));
        (keys, debug)
    });
    assert!(data_keys.len() >= 2, "two epochs");

    let mut needles: Vec<Vec<u8>> = Vec::new();
    for s in cmk_versions.iter().chain(&data_keys) {
        needles.extend(forms(s));
    }
    if let Some(i) = find(&transcript, &needles) {
        panic!(
            "a key ({:?}) appears in the command output",
            String::from_utf8_lossy(&needles[i])
        );
    }
    assert!(
        find(debug_text.as_bytes(), &needles).is_none(),
        "Debug output shows a key: {debug_text}"
    );
    // Files: the store, the state dir (reports, audit log, tenant memory), the
    // key directory (data keys only: the CMK material lives there by design),
    // and the temp dir (drill scratch, staging files).
    let data_needles: Vec<Vec<u8>> = data_keys.iter().flat_map(|k| forms(k)).collect();
    for (root, set) in [
        (cli.store(), &needles),
        (cli.path().join("state"), &needles),
        (cli.path().join("keys"), &data_needles),
        (std::env::temp_dir(), &needles),
    ] {
        let in_tmp = root == std::env::temp_dir();
        for f in files_of(&root, in_tmp) {
            if in_tmp && f.starts_with(cli.path()) {
                continue; // already covered, and the key file is in there
            }
            let Ok(bytes) = fs::read(&f) else { continue };
            if let Some(i) = find(&bytes, set) {
                panic!(
                    "{} holds a key ({:?})",
                    f.display(),
                    String::from_utf8_lossy(&set[i])
                );
            }
        }
    }
}

#[test]
fn loose_permissions_are_warned_about_or_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    let cfg = cli.path().join("custos.toml");
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o666)).unwrap();
    // Refused by every command, naming the file and the fix; nothing stored.
    for args in [vec!["backup", "acme"], vec!["audit", "verify"]] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(&format!("chmod go-w {}", cfg.display())),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(
        r.json()["error"]["kind"],
        "insecure_permissions",
        "{}",
        r.stdout
    );
    assert!(cli.objects("acme").is_empty());
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o600)).unwrap();
    let r = cli.run_env(&["backup", "acme"], &[("CUSTOS_LOG", "warn")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("writable by group"), "{}", r.stderr);
    // A key file readable by others is refused, naming the file.
    let key = cli.path().join("keys/acme.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let r = cli.run(&["check", "acme", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert!(e["message"].as_str().unwrap().contains("acme.key"), "{e}");
    assert_eq!(e["kind"], "key_provider_error", "{e}");
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `args`, expects a refusal naming `path` and `fix` (and, with
/// `--json`, the kind `insecure_permissions`), and that the store did not change.
fn refused(cli: &Cli, args: &[&str], path: &Path, fix: &str) {
    let before = cli.objects("acme");
    let r = cli.run(args);
    assert_eq!(r.code, 1, "{args:?}: {}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&path.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(fix), "{}", r.stderr);
    if args[0] != "audit" {
        let mut args = args.to_vec();
        args.push("--json");
        let r = cli.run(&args);
        assert_eq!(
            r.json()["error"]["kind"],
            "insecure_permissions",
            "{args:?}: {}",
            r.stdout
        );
    }
    assert_eq!(cli.objects("acme"), before, "{args:?} changed the store");
}

/// Issue 12, item 7: a key directory of mode 0777 was used without a word,
/// so any local user could plant `keys/beta.destroyed` (and make beta's data
/// unreadable) or replace a key. Like ssh's StrictModes, the key directory
/// and every directory above it must be owned by root or the user running
/// custos and not writable by group or others.
#[test]
fn a_key_directory_others_can_write_is_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let keys = cli.path().join("keys");
    assert_eq!(
        fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let fix = format!("chmod 700 {}", keys.display());
    for mode in [0o777, 0o770, 0o703, 0o1777] {
        chmod(&keys, mode);
        refused(&cli, &["backup", "acme"], &keys, &fix);
        refused(&cli, &["snapshots", "acme"], &keys, &fix);
    }
    // The attack itself: a planted tombstone in a loose directory is never read.
    fs::write(keys.join("acme.destroyed"), b"{}").unwrap();
    refused(&cli, &["check", "acme"], &keys, &fix);
    fs::remove_file(keys.join("acme.destroyed")).unwrap();
    chmod(&keys, 0o700);
    cli.ok(&["check", "acme"]);

    // What an attacker tries next: a loose directory above (not sticky), a
    // key directory that is a symlink into a loose one, another owner.
    let above = cli.path().join("above");
    fs::create_dir(&above).unwrap();
    fs::rename(&keys, above.join("keys")).unwrap();
    std::os::unix::fs::symlink(above.join("keys"), &keys).unwrap();
    cli.ok(&["check", "acme"]);
    chmod(&above, 0o777);
    refused(
        &cli,
        &["check", "acme"],
        &above,
        &format!("chmod go-w {}", above.display()),
    );
    // Sticky, like /tmp: others cannot move our entries: accepted.
    chmod(&above, 0o1777);
    cli.ok(&["check", "acme"]);
    chmod(&above, 0o755);
    if euid() == 0 {
        std::os::unix::fs::chown(above.join("keys"), Some(65534), None).unwrap();
        refused(&cli, &["check", "acme"], &keys, "owned by uid 65534");
        std::os::unix::fs::chown(above.join("keys"), Some(0), None).unwrap();
    }
    cli.ok(&["check", "acme"]);
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The state directory is the trust anchor against replays: a loose one (or
/// a loose subdirectory or tenant file in it) is refused.
#[test]
fn a_state_directory_others_can_write_is_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let state = cli.path().join("state");
    chmod(&state, 0o777);
    refused(
        &cli,
        &["backup", "acme"],
        &state,
        &format!("chmod 700 {}", state.display()),
    );
    refused(&cli, &["audit", "verify"], &state, "chmod");
    chmod(&state, 0o700);
    let tenants = state.join("tenants");
    chmod(&tenants, 0o770);
    refused(
        &cli,
        &["check", "acme"],
        &tenants,
        &format!("chmod 700 {}", tenants.display()),
    );
    chmod(&tenants, 0o700);
    let memory = tenants.join("acme.json");
    cli.ok(&["backup", "acme"]);
    assert!(memory.exists());
    chmod(&memory, 0o622);
    refused(
        &cli,
        &["check", "acme"],
        &memory,
        &format!("chmod go-w {}", memory.display()),
    );
    chmod(&memory, 0o600);
    cli.ok(&["check", "acme"]);
}

/// A policy says what to back up and which key to use: a group-writable
/// policy file (or defaults.toml, or policies directory) is refused.
#[test]
fn a_group_writable_policy_is_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    let policies = cli.path().join("policies");
    let file = policies.join("acme.toml");
    let defaults = policies.join("defaults.toml");
    fs::write(&defaults, "[retention]\nkeep_last = 3\n").unwrap();
    cli.ok(&["policy", "validate"]);
    for (path, mode) in [(&file, 0o664), (&defaults, 0o666), (&policies, 0o777)] {
        chmod(path, mode);
        let r = cli.run(&["policy", "validate"]);
        assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
        let fix = format!("chmod go-w {}", path.display());
        assert!(r.stdout.contains(&fix), "{}", r.stdout);
        let r = cli.run(&["backup", "acme", "--json"]);
        assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
        let e = r.json()["error"].clone();
        assert_eq!(e["kind"], "invalid_policy", "{e}");
        assert!(e["message"].as_str().unwrap().contains(&fix), "{e}");
        assert!(cli.objects("acme").is_empty());
        chmod(path, if path.is_dir() { 0o755 } else { 0o644 });
    }
    // Readable by all is fine (a fresh checkout with umask 022).
    cli.ok(&["policy", "validate"]);
    cli.ok(&["backup", "acme"]);
}

/// Files of the key directory that belong to key `name` (its key file,
/// tombstone and temporary files).
fn key_files(keys: &Path, name: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(&format!("{name}.")) || n.starts_with(&format!(".{name}.")))
        .collect();
    v.sort();
    v
}

fn temp_files(keys: &Path, name: &str) -> Vec<String> {
    key_files(keys, name)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Runs `args` with `CUSTOS_CRASH_AT=crash_at` (empty: none), retrying
/// while a killed run's lease is still live.
fn settled(cli: &Cli, args: &[&str], crash_at: &str) -> common::Run {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = cli.run_env(args, &[("CUSTOS_CRASH_AT", crash_at)]);
        if r.code != 0 && r.stderr.contains("is busy") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(300));
            continue;
        }
        return r;
    }
}

/// The single certificate of `tenant`, written to a file.
fn certificate_file(cli: &Cli, tenant: &str) -> std::path::PathBuf {
    let ids = cli.ok(&["certificate", "get", tenant]);
    let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let file = cli.path().join(format!("{tenant}.certificate.json"));
    cli.ok(&[
        "certificate",
        "get",
        tenant,
        ids[0],
        "--out",
        file.to_str().unwrap(),
    ]);
    file
}

/// Every version's material of a key file's JSON, base64 as stored.
fn materials(key_file_json: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(key_file_json).unwrap();
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["material"].as_str().unwrap().to_owned())
        .collect()
}

/// Issue 12, item 2: `rotate --cmk` killed between writing the new key file
/// and renaming it into place left `keys/.alpha.key.tmp-*` holding every key
/// version; neither a later rotation nor `shred alpha` removed it, and
/// `certificate verify --online` passed. Now the rotation really is killed
/// there (crash hook), the shred leaves no file of the key but its
/// tombstone, the certificate verifies online, and a copy planted after the
/// shred makes `--online` fail, naming it.
#[test]
fn a_rotation_killed_before_its_rename_leaves_no_key_material_after_a_shred() {
    let cli = Cli::new();
    // A killed run's lease must run out before the next job (the minimum TTL).
    let cfg = cli.path().join("custos.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{text}[daemon]\nlease_ttl = \"1s\"\n")).unwrap();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("alpha", &data);
    cli.ok(&["backup", "alpha"]);
    let keys = cli.path().join("keys");
    // Killed once its new key file is in place (before the directory
    // fsync), then once before the rename: that one leaves the temporary
    // file, with every version, the new third one included.
    for point in ["installed", "written"] {
        let r = settled(
            &cli,
            &["rotate", "alpha", "--cmk"],
            &format!("local-key:{point}"),
        );
        assert!(r.stderr.contains("aborting here"), "{point}: {}", r.stderr);
    }
    let left = temp_files(&keys, "alpha");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".alpha.key.tmp-"), "{left:?}");
    let leftover = fs::read(keys.join(&left[0])).unwrap();
    let all = materials(&leftover);
    assert_eq!(all.len(), 3);
    assert_eq!(
        materials(&fs::read(keys.join("alpha.key")).unwrap()).len(),
        2
    );

    let r = settled(&cli, &["shred", "alpha", "--confirm", "alpha"], "");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(key_files(&keys, "alpha"), ["alpha.destroyed"]);
    for f in fs::read_dir(&keys).unwrap() {
        let bytes = fs::read(f.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            all.iter().all(|m| !text.contains(m.as_str())),
            "key material in the key directory after the shred"
        );
    }
    let cert = certificate_file(&cli, "alpha");
    cli.ok(&["certificate", "verify", cert.to_str().unwrap(), "--online"]);

    // Planted after the shred (as a copy from before it would be): found,
    // reported, and removed by that run.
    let planted = keys.join(".alpha.key.tmp-0123456789ab");
    fs::write(&planted, &leftover).unwrap();
    chmod(&planted, 0o600);
    let r = cli.run(&["certificate", "verify", cert.to_str().unwrap(), "--online"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&planted.display().to_string()),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("key material"), "{}", r.stdout);
    assert!(!planted.exists());
    // So is what is left of a key file beside its tombstone.
    fs::write(keys.join("alpha.key"), &leftover).unwrap();
    chmod(&keys.join("alpha.key"), 0o600);
    let r = cli.run(&["certificate", "verify", cert.to_str().unwrap(), "--online"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("alpha.key"), "{}", r.stdout);
    cli.ok(&["certificate", "verify", cert.to_str().unwrap(), "--online"]);
    assert_eq!(key_files(&keys, "alpha"), ["alpha.destroyed"]);
}

/// The same leftover as a killed rotation leaves (a copy of the key file
/// under its temporary name): the next command sweeps it, overwriting it
/// before the unlink (a hard link outside the directory shows the bytes are
/// gone), without touching the live key; one left after that start goes
/// with the shred. On the old code the leftover survived everything.
#[test]
fn leftover_key_material_is_swept_at_start_and_by_a_shred() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("alpha", &data);
    cli.policy("beta", &data);
    cli.ok(&["backup", "alpha"]);
    cli.ok(&["backup", "beta"]);
    cli.ok(&["rotate", "alpha", "--cmk"]);
    let keys = cli.path().join("keys");
    let plant = |tag: &str| {
        let p = keys.join(format!(".alpha.key.tmp-{tag}"));
        fs::copy(keys.join("alpha.key"), &p).unwrap();
        chmod(&p, 0o600);
        let witness = cli.path().join(format!("witness-{tag}"));
        fs::hard_link(&p, &witness).unwrap();
        (p, witness)
    };
    let zeroed = |p: &Path| fs::read(p).unwrap().iter().all(|&b| b == 0);

    let (p, witness) = plant("0123456789ab");
    cli.ok(&["backup", "alpha"]);
    assert!(!p.exists());
    assert!(zeroed(&witness), "overwritten before the unlink");
    cli.ok(&["check", "alpha", "--read-data"]);
    // A second name of the live key file (a creation killed between its
    // link and its unlink) is unlinked, never overwritten.
    let second = keys.join(".alpha.new-00000000000a");
    fs::hard_link(keys.join("alpha.key"), &second).unwrap();
    cli.ok(&["snapshots", "alpha"]);
    assert!(!second.exists());
    cli.ok(&["check", "alpha", "--read-data"]);

    // A writer of another process holds the key directory's lock (here: the
    // test): its temporary file is in use, so the shred's start must leave
    // it; the destruction waits for the lock, then sweeps it.
    let (p, witness) = plant("00000000000b");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(keys.join(".custos-keys.lock"))
        .unwrap();
    lock.lock().unwrap();
    std::thread::scope(|s| {
        let shred = s.spawn(|| cli.run(&["shred", "alpha", "--confirm", "alpha"]));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(p.exists() && !zeroed(&witness), "swept under a live writer");
        lock.unlock().unwrap();
        let r = shred.join().unwrap();
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    });
    assert!(!p.exists() && zeroed(&witness));
    assert_eq!(key_files(&keys, "alpha"), ["alpha.destroyed"]);
    // Beta's key is untouched.
    cli.ok(&["check", "beta", "--read-data"]);
}

/// A drill restores a tenant's decrypted files into a private directory
/// (0700) it creates in its scratch parent. A parent another local user can
/// change (theirs, or writable without the sticky bit, e.g. a
/// `/tmp/custos-drills` they created first) let them rename that directory
/// and put their own in its place, which the restore then filled: refused
/// before anything is restored. A sticky parent (`/tmp`) stays accepted.
#[test]
fn a_drill_scratch_parent_others_can_change_is_refused() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let parent = cli.path().join("scratch");
    fs::create_dir(&parent).unwrap();
    let drill = |cli: &Cli| {
        let r = cli.run(&[
            "drill",
            "acme",
            "--json",
            "--target",
            parent.to_str().unwrap(),
        ]);
        let report = r.json()["result"].clone();
        (r.code, report, r.stderr)
    };
    let (code, r, err) = drill(&cli);
    assert_eq!(code, 0, "{r}\n{err}");
    let mut loose = vec![0o777, 0o770, 0o722];
    if euid() == 0 {
        loose.push(0o755); // and given to another user below
    }
    for mode in loose {
        chmod(&parent, mode);
        if mode == 0o755 {
            std::os::unix::fs::chown(&parent, Some(65534), None).unwrap();
        }
        let (code, r, err) = drill(&cli);
        assert_eq!(code, 1, "{mode:o}: {r}\n{err}");
        assert_eq!(r["reason"], "insecure_permissions", "{mode:o}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains(&parent.display().to_string()),
            "{r}"
        );
        assert!(r["scratch"]["dir"].is_null(), "nothing created: {r}");
        assert_eq!(fs::read_dir(&parent).unwrap().count(), 0);
    }
    if euid() == 0 {
        std::os::unix::fs::chown(&parent, Some(0), None).unwrap();
    }
    chmod(&parent, 0o1777);
    let (code, r, err) = drill(&cli);
    assert_eq!(code, 0, "sticky, as /tmp: {r}\n{err}");
}

/// A second name of a key file elsewhere on the file system (a hard link an
/// admin's copy tool or an earlier root process made) was silently kept
/// when a rotation renamed a new key file over it: that inode, with every
/// version of the key so far, survived the shred, whose certificate still
/// said the key was destroyed. A key file with other names is not replaced.
#[test]
fn a_key_file_with_another_name_is_not_replaced() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let key = cli.path().join("keys/acme.key");
    let elsewhere = cli.path().join("copy-of-acme.key");
    fs::hard_link(&key, &elsewhere).unwrap();
    let before = fs::read(&key).unwrap();
    let r = cli.run(&["rotate", "acme", "--cmk"]);
    assert_ne!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("2 names"), "{}", r.stderr);
    assert_eq!(fs::read(&key).unwrap(), before, "key file unchanged");
    // A shred overwrites the key file's inode: the other name holds zeros.
    cli.ok(&["shred", "acme", "--confirm", "acme"]);
    let left = fs::read(&elsewhere).unwrap();
    assert!(
        left.iter().all(|&b| b == 0),
        "material left in the other name"
    );
}

/// A crash must leave no key bytes in a core file, and another process of
/// the user custos runs as must not read its memory (`/proc/<pid>/mem`,
/// ptrace): custos runs with no core limit and not dumpable (its `/proc`
/// entries then belong to root).
#[test]
fn no_core_dumps_and_no_memory_reads_by_the_same_user() {
    if euid() != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root (to run custos as another user) and setpriv");
        return;
    }
    let cli = Cli::new();
    let data = cli.path().join("data");
    common::make_tree(&data, 2);
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    let chown = std::process::Command::new("chown")
        .args(["-R", "4242:4242"])
        .arg(cli.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let mut child = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=4242", "--regid=4242", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(cli.path().join("custos.toml"))
        .arg("daemon")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proc_dir = Path::new("/proc").join(child.id().to_string());
    // setpriv execs custos in place: wait until the pid runs custos.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read_link(proc_dir.join("exe"))
        .map(|p| !p.to_string_lossy().contains("custos"))
        .unwrap_or(true)
    {
        assert!(std::time::Instant::now() < deadline, "custos did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let limits = fs::read_to_string(proc_dir.join("limits")).unwrap_or_default();
    let mem_owner = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(proc_dir.join("mem")).map(|m| m.uid())
    };
    let _ = child.kill();
    let _ = child.wait();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(&core[4..6], ["0", "0"], "{limits}");
    assert_eq!(
        mem_owner.unwrap(),
        0,
        "not dumpable: its memory is not the user's to read"
    );
}

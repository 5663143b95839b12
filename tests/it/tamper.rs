//! Someone with write access to the store tampers with it. Every case is
//! detected by `check --read-data`, by `restore` and by `drill`, with a
//! non-zero exit and an error naming the object; detection changes nothing
//! in the store.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::{Cli, Run};

/// A tenant with two snapshots of a small tree (several packs), ready to tamper with.
fn setup(tenant: &str) -> (Cli, PathBuf) {
    let cli = Cli::new();
    let data = cli.path().join(format!("data-{tenant}"));
    common::make_tree(&data, 20);
    cli.policy(tenant, &data);
    cli.ok(&["backup", tenant]);
    fs::write(data.join("later.txt"), "a second snapshot").unwrap();
    cli.ok(&["backup", tenant]);
    (cli, data)
}

fn flip(path: &Path, at: Option<usize>) {
    let mut b = fs::read(path).unwrap();
    let i = at.unwrap_or(b.len() / 2);
    b[i] ^= 0x01;
    fs::write(path, b).unwrap();
}

/// The biggest pack (the one holding file data rather than a small tree blob).
fn biggest(paths: Vec<PathBuf>) -> PathBuf {
    paths
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
}

fn object_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// check --read-data and restore both fail, naming `object`, with `kind`;
/// neither changes the store.
fn assert_detected(cli: &Cli, tenant: &str, object: &str, kind: &str) {
    let before = cli.objects(tenant);
    // Packs read whole (these are smaller than a window), and in windows of
    // 100 bytes with the pack's last 100 bytes read first.
    for envs in [&[][..], &[("CUSTOS_CHECK_WINDOW", "100")][..]] {
        let check = cli.run_env(&["check", tenant, "--read-data", "--json"], envs);
        assert_eq!(
            check.code, 1,
            "check {envs:?} should fail:\n{}\n{}",
            check.stdout, check.stderr
        );
        assert_check_failed(cli, tenant, &check);
        let faults = check.json()["result"]["faults"].clone();
        let named: Vec<&serde_json::Value> = faults
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["object"].as_str().unwrap().contains(object))
            .collect();
        assert!(
            !named.is_empty(),
            "{envs:?}: no fault names {object}: {faults}"
        );
        assert!(
            named.iter().any(|f| f["kind"] == kind),
            "{envs:?}: expected kind {kind} for {object}: {faults}"
        );
    }

    let target = cli.path().join(format!("restore-{}", object));
    let restore: Run = cli.run(&[
        "restore",
        tenant,
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        restore.code, 1,
        "restore should fail:\n{}\n{}",
        restore.stdout, restore.stderr
    );
    let err = restore.json()["error"].clone();
    assert!(
        err["message"].as_str().unwrap().contains(object),
        "restore error does not name {object}: {err}"
    );
    assert_eq!(err["kind"], kind, "restore error kind: {err}");
    assert!(
        restore.stderr.contains(object),
        "stderr names the object: {}",
        restore.stderr
    );
    assert_drill_fails(cli, tenant, object, kind);
    assert_eq!(
        before,
        cli.objects(tenant),
        "detection must not change the store"
    );
}

/// A `check --json` that found faults says so: `"ok": false`, an error of
/// the first fault's kind beside the full report, and a job report (and
/// `job.finished`) with `outcome: failure` (issue 12, case 11: it printed
/// `"ok": true` and logged `outcome=success` while exiting 1).
fn assert_check_failed(cli: &Cli, tenant: &str, check: &Run) {
    let doc = check.json();
    assert_eq!(doc["ok"], false, "{doc}");
    let faults = doc["result"]["faults"].as_array().unwrap();
    assert!(!faults.is_empty(), "{doc}");
    assert_eq!(doc["error"]["kind"], faults[0]["kind"], "{doc}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("check found {} fault(s)", faults.len()))
            && message.contains(faults[0]["object"].as_str().unwrap()),
        "{doc}"
    );
    let reports = cli.path().join("state/reports").join(tenant);
    let mut checks: Vec<_> = fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-check.json"))
        .collect();
    checks.sort();
    let stored: serde_json::Value =
        serde_json::from_slice(&fs::read(checks.last().unwrap()).unwrap()).unwrap();
    assert_eq!(stored["outcome"], "failure", "{stored}");
    assert_eq!(stored["error_kind"], faults[0]["kind"], "{stored}");
    assert_eq!(stored["result"]["faults"], doc["result"]["faults"]);
    // `job.finished` is logged from the same report, as a failure.
    assert!(
        check.stderr.contains(&format!("check of {tenant} failed")),
        "{}",
        check.stderr
    );
}

/// `custos drill` fails with `kind`, naming `object`.
fn assert_drill_fails(cli: &Cli, tenant: &str, object: &str, kind: &str) {
    let drill = cli.run(&["drill", tenant, "--json"]);
    assert_eq!(
        drill.code, 1,
        "drill should fail:\n{}\n{}",
        drill.stdout, drill.stderr
    );
    // A drill reports its own coarse reason (`corrupt_object` covers foreign
    // and replayed objects too) and the exact error kind behind it.
    let report = drill.json();
    assert_eq!(
        report["result"]["error_kind"], kind,
        "drill error kind: {report}"
    );
    assert_eq!(report["result"]["outcome"], "failed");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains(object),
        "drill error does not name {object}: {report}"
    );
}

#[test]
fn flipped_byte_in_a_pack() {
    let (cli, _) = setup("acme");
    let pack = biggest(cli.object_paths("acme", "packs"));
    flip(&pack, None);
    assert_detected(&cli, "acme", &object_name(&pack), "corrupt_object");
}

#[test]
fn flipped_byte_in_an_index_file() {
    let (cli, _) = setup("acme");
    let index = cli.object_paths("acme", "index")[0].clone();
    flip(&index, Some(100));
    assert_detected(&cli, "acme", &object_name(&index), "corrupt_object");
}

#[test]
fn flipped_byte_in_a_snapshot() {
    let (cli, _) = setup("acme");
    let snap = cli.object_paths("acme", "snapshots")[0].clone();
    flip(&snap, Some(90));
    assert_detected(&cli, "acme", &object_name(&snap), "corrupt_object");
}

#[test]
fn flipped_byte_in_a_pack_header() {
    let (cli, _) = setup("acme");
    let pack = biggest(cli.object_paths("acme", "packs"));
    flip(&pack, Some(60)); // inside the key commitment
    assert_detected(&cli, "acme", &object_name(&pack), "corrupt_object");
}

/// The trailer (blob count and directory length, not authenticated) and the
/// directory's last byte, each changed in turn.
#[test]
fn flipped_byte_in_a_pack_trailer_or_directory() {
    for from_end in [1, 3, 5, 9] {
        let (cli, _) = setup("acme");
        let pack = biggest(cli.object_paths("acme", "packs"));
        let len = fs::metadata(&pack).unwrap().len() as usize;
        flip(&pack, Some(len - from_end));
        assert_detected(&cli, "acme", &object_name(&pack), "corrupt_object");
    }
}

#[test]
fn truncated_pack() {
    let (cli, _) = setup("acme");
    let pack = biggest(cli.object_paths("acme", "packs"));
    let b = fs::read(&pack).unwrap();
    fs::write(&pack, &b[..b.len() - 100]).unwrap();
    assert_detected(&cli, "acme", &object_name(&pack), "corrupt_object");
}

#[test]
fn extended_pack() {
    let (cli, _) = setup("acme");
    let pack = biggest(cli.object_paths("acme", "packs"));
    let mut b = fs::read(&pack).unwrap();
    b.extend_from_slice(b"appended by an attacker");
    fs::write(&pack, &b).unwrap();
    assert_detected(&cli, "acme", &object_name(&pack), "corrupt_object");
}

/// acme's `pick` pack replaces beta's `victim` pack, under beta's name.
fn move_pack_to_beta(pick: fn(Vec<PathBuf>) -> PathBuf, victim: fn(Vec<PathBuf>) -> PathBuf) {
    let (cli, _) = setup("acme");
    let data_b = cli.path().join("data-beta");
    common::make_tree(&data_b, 5);
    cli.policy("beta", &data_b);
    cli.ok(&["backup", "beta"]);
    let victim = victim(cli.object_paths("beta", "packs"));
    let moved = pick(cli.object_paths("acme", "packs"));
    fs::copy(moved, &victim).unwrap();
    assert_detected(&cli, "beta", &object_name(&victim), "foreign_object");
    let check = cli.run(&["check", "beta", "--read-data"]);
    assert!(
        check.stdout.contains("another tenant"),
        "the error says so: {}",
        check.stdout
    );
}

fn smallest(paths: Vec<PathBuf>) -> PathBuf {
    paths
        .into_iter()
        .min_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
}

#[test]
fn longer_pack_moved_across_tenants() {
    move_pack_to_beta(biggest, smallest);
}

/// A moved pack shorter than the index says is still reported as foreign, not
/// as truncated: its header is read to tell (CI once caught restore saying
/// "truncated" when acme's pack happened to be the shorter one).
#[test]
fn shorter_pack_moved_across_tenants() {
    move_pack_to_beta(smallest, biggest);
}

#[test]
fn snapshot_and_index_copied_from_another_tenant() {
    let (cli, _) = setup("acme");
    let data_b = cli.path().join("data-beta");
    common::make_tree(&data_b, 5);
    cli.policy("beta", &data_b);
    cli.ok(&["backup", "beta"]);
    let snap = cli.object_paths("acme", "snapshots")[0].clone();
    let dest = cli
        .store()
        .join("tenants/beta/snapshots")
        .join(object_name(&snap));
    fs::copy(&snap, &dest).unwrap();
    assert_detected(&cli, "beta", &object_name(&snap), "foreign_object");
    fs::remove_file(&dest).unwrap();
    let index = cli.object_paths("acme", "index")[0].clone();
    fs::copy(
        &index,
        cli.store()
            .join("tenants/beta/index")
            .join(object_name(&index)),
    )
    .unwrap();
    assert_detected(&cli, "beta", &object_name(&index), "foreign_object");
}

#[test]
fn two_blobs_swapped_inside_a_pack() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    // Incompressible files of equal size: equal-length blobs; with one pack per
    // packer worker, some pack holds at least two of them.
    for i in 0..8 {
        let mut b = vec![0u8; 4096];
        custos::util::fill_random(&mut b);
        fs::write(data.join(format!("{i}.bin")), b).unwrap();
    }
    cli.policy("acme", &data);
    cli.ok(&["backup", "acme"]);
    // Find them through the index (the test holds the key; an attacker needs only
    // to guess equal lengths).
    let (pack, a, b) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ctx = custos::context::Context::embedded(cli.path()).unwrap();
        let repo = custos::repo::Repo::open(&ctx, &custos::TenantId::new("acme").unwrap(), None)
            .await
            .unwrap();
        let index = repo.load_index_strict().await.unwrap();
        let mut by_pack: std::collections::BTreeMap<_, Vec<custos::repo::Location>> =
            Default::default();
        for (_, loc) in index.blobs() {
            if loc.kind == custos::format::pack::BlobKind::Data && loc.raw_len == 4096 {
                by_pack.entry(index.pack(loc).0).or_default().push(*loc);
            }
        }
        let (pack, locs) = by_pack
            .into_iter()
            .find(|(_, v)| v.len() >= 2)
            .expect("a pack with two equal blobs");
        (pack, locs[0], locs[1])
    });
    let path = cli
        .store()
        .join(format!("tenants/acme/packs/{}/{pack}", &pack.to_hex()[..2]));
    let mut bytes = fs::read(&path).unwrap();
    let len = a.sealed_len as usize;
    assert_eq!(len, b.sealed_len as usize);
    let (x, y) = (a.offset as usize, b.offset as usize);
    let (first, second) = (bytes[x..x + len].to_vec(), bytes[y..y + len].to_vec());
    bytes[x..x + len].copy_from_slice(&second);
    bytes[y..y + len].copy_from_slice(&first);
    fs::write(&path, bytes).unwrap();
    assert_detected(&cli, "acme", &pack.to_hex(), "corrupt_object");
}

#[test]
fn flipped_byte_in_an_envelope() {
    let (cli, _) = setup("acme");
    let env = cli.store().join("tenants/acme/keys/1");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&env).unwrap()).unwrap();
    let ct = v["wrapped"]["ciphertext"].as_str().unwrap().to_owned();
    use base64::Engine;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(ct)
        .unwrap();
    raw[20] ^= 1;
    v["wrapped"]["ciphertext"] = base64::engine::general_purpose::STANDARD.encode(raw).into();
    fs::write(&env, serde_json::to_vec(&v).unwrap()).unwrap();
    let before = cli.objects("acme");
    for args in [
        vec!["check", "acme", "--read-data", "--json"],
        vec![
            "restore",
            "acme",
            "latest",
            "--target",
            "/nonexistent-custos-target",
            "--json",
        ],
        vec!["drill", "acme", "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        let j = r.json();
        let e = j["error"].clone();
        let kind = if args[0] == "drill" {
            j["result"]["error_kind"].clone()
        } else {
            e["kind"].clone()
        };
        assert_eq!(kind, "key_unwrap_failed", "{j}");
        assert!(e["message"].as_str().unwrap().contains("local:acme"), "{e}");
    }
    assert_eq!(before, cli.objects("acme"));
    assert!(!Path::new("/nonexistent-custos-target").exists());
}

#[test]
fn replayed_snapshot_after_forget() {
    let (cli, data) = setup("acme");
    fs::write(data.join("third.txt"), "3").unwrap();
    cli.ok(&["backup", "acme"]);
    let snaps = cli.object_paths("acme", "snapshots");
    let saved: Vec<(PathBuf, Vec<u8>)> = snaps
        .iter()
        .map(|p| (p.clone(), fs::read(p).unwrap()))
        .collect();
    cli.ok(&["forget", "acme", "--keep-last", "1"]);
    let forgotten: Vec<_> = saved.iter().filter(|(p, _)| !p.exists()).collect();
    assert_eq!(forgotten.len(), 2);
    // The attacker puts a forgotten snapshot back.
    let (path, bytes) = forgotten[0];
    fs::write(path, bytes).unwrap();
    assert_detected(&cli, "acme", &object_name(path), "rollback_detected");
}

#[test]
fn index_rolled_back_after_prune() {
    let (cli, data) = setup("acme");
    let old_index: Vec<(PathBuf, Vec<u8>)> = cli
        .object_paths("acme", "index")
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    fs::write(data.join("third.txt"), "3").unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["prune", "acme"]);
    // prune consolidated the index; an old index file comes back.
    let (path, bytes) = &old_index[0];
    assert!(!path.exists(), "prune replaced the old index files");
    fs::write(path, bytes).unwrap();
    assert_detected(&cli, "acme", &object_name(path), "rollback_detected");
}

#[test]
fn newest_index_deleted() {
    let (cli, data) = setup("acme");
    let before: Vec<_> = cli.object_paths("acme", "index");
    fs::write(data.join("third.txt"), "new data only in the newest index").unwrap();
    cli.ok(&["backup", "acme"]);
    let newest = cli
        .object_paths("acme", "index")
        .into_iter()
        .find(|p| !before.contains(p))
        .unwrap();
    fs::remove_file(&newest).unwrap();
    let check = cli.run(&["check", "acme", "--read-data", "--json"]);
    assert_eq!(check.code, 1);
    let faults = check.json()["result"]["faults"].to_string();
    assert!(
        faults.contains("missing_object") && faults.contains("snapshots/"),
        "{faults}"
    );
    let target = cli.path().join("r");
    let restore = cli.run(&[
        "restore",
        "acme",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(restore.code, 1);
    assert_eq!(
        restore.json()["error"]["kind"],
        "missing_object",
        "{}",
        restore.stdout
    );
    let drill = cli.run(&["drill", "acme", "--json"]);
    assert_eq!(drill.code, 1, "{}", drill.stdout);
    assert_eq!(drill.json()["result"]["error_kind"], "missing_object");
}

#[test]
fn old_tenant_descriptor_replayed() {
    let (cli, _) = setup("acme");
    let path = cli.store().join("tenants/acme/tenant.json");
    let old = fs::read(&path).unwrap();
    // A legitimate change bumps the descriptor's generation (as rotation and
    // shredding do); custos remembers the highest generation it has seen.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ctx = custos::context::Context::embedded(cli.path()).unwrap();
        let mut repo =
            custos::repo::Repo::open(&ctx, &custos::TenantId::new("acme").unwrap(), None)
                .await
                .unwrap();
        let generation = repo.descriptor().generation;
        repo.update_descriptor(|_| {}).await.unwrap();
        assert_eq!(repo.descriptor().generation, generation + 1);
    });
    cli.ok(&["check", "acme"]);
    // The attacker puts the old descriptor back.
    fs::write(&path, &old).unwrap();
    let before = cli.objects("acme");
    let target = cli.path().join("r");
    for args in [
        vec!["check", "acme", "--read-data", "--json"],
        vec![
            "restore",
            "acme",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--json",
        ],
        vec!["drill", "acme", "--json"],
        vec!["backup", "acme", "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}\n{}", r.stdout, r.stderr);
        let j = r.json();
        let e = j["error"].clone();
        let kind = if args[0] == "drill" {
            j["result"]["error_kind"].clone()
        } else {
            e["kind"].clone()
        };
        assert_eq!(kind, "rollback_detected", "{args:?}: {j}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("tenants/acme/tenant.json") && msg.contains("replayed"),
            "{args:?}: {e}"
        );
    }
    assert!(!target.exists(), "nothing restored");
    assert_eq!(before, cli.objects("acme"), "detection changes nothing");
}

/// One snapshot of a small tree; returns the snapshot id.
fn one_snapshot(cli: &Cli, data: &Path) -> String {
    common::make_tree(data, 20);
    cli.policy("acme", data);
    let b = cli.run(&["backup", "acme", "--json"]);
    assert_eq!(b.code, 0, "{}\n{}", b.stdout, b.stderr);
    b.json()["result"]["snapshot"].as_str().unwrap().to_owned()
}

fn restore_into(cli: &Cli, snapshot: &str, name: &str) -> Run {
    let target = cli.path().join(name);
    cli.run(&[
        "restore",
        "acme",
        snapshot,
        "--target",
        target.to_str().unwrap(),
        "--json",
    ])
}

/// Issue 12, case 10: with one pack deleted from the store, `backup
/// --force-read` exited 0 and its new snapshot failed to restore with
/// `missing_object`: the backup deduplicated against the index, which still
/// named the lost pack. Now the backup lists the packs first and stores
/// again what is gone. Without `--force-read`, unchanged files whose blobs
/// were lost are read again. Whichever pack is lost (file data or the tree),
/// `check` reports it first, and the next backup heals every snapshot whose
/// data the sources still hold.
#[test]
fn a_lost_pack_is_stored_again_by_the_next_backup() {
    type Pick = fn(Vec<PathBuf>) -> PathBuf;
    // A truncated pack has lost its directory: all of it is as good as gone.
    for (pick, which, truncate, force_read) in [
        (biggest as Pick, "biggest", false, true),
        (biggest as Pick, "biggest", false, false),
        (smallest as Pick, "smallest", false, true),
        (smallest as Pick, "smallest", false, false),
        (biggest as Pick, "biggest", true, false),
    ] {
        let case = format!("{which} pack lost (truncated: {truncate}), force_read {force_read}");
        let cli = Cli::new();
        let data = cli.path().join("data");
        let first = one_snapshot(&cli, &data);
        let lost = pick(cli.object_paths("acme", "packs"));
        let lost_name = object_name(&lost);
        let (kind, leftover) = if truncate {
            let f = fs::OpenOptions::new().write(true).open(&lost).unwrap();
            f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            ("corrupt_object", 1)
        } else {
            fs::remove_file(&lost).unwrap();
            ("missing_object", 0)
        };

        // check reports the loss, naming the pack.
        let check = cli.run(&["check", "acme", "--json"]);
        assert_eq!(check.code, 1, "{case}: {}", check.stdout);
        assert_check_failed(&cli, "acme", &check);
        let faults = check.json()["result"]["faults"].to_string();
        assert!(
            faults.contains(&lost_name) && faults.contains(kind),
            "{case}: {faults}"
        );

        let mut args = vec!["backup", "acme", "--json"];
        if force_read {
            args.push("--force-read");
        }
        let b = cli.run(&args);
        assert_eq!(b.code, 0, "{case}: {}\n{}", b.stdout, b.stderr);
        let report = b.json()["result"].clone();
        assert!(
            report["warnings"].to_string().contains(&lost_name),
            "{case}: the backup names the lost pack: {report}"
        );
        assert!(
            report["summary"]["blobs_new"].as_u64().unwrap() > 0,
            "{case}: {report}"
        );

        // The new snapshot restores byte-exact, and so does the first one:
        // every blob it lost was stored again from the unchanged source.
        let r = restore_into(&cli, "latest", "r-latest");
        assert_eq!(r.code, 0, "{case}: {}\n{}", r.stdout, r.stderr);
        common::assert_same(&data, &cli.path().join("r-latest/data"));
        let r = restore_into(&cli, &first, "r-first");
        assert_eq!(r.code, 0, "{case}: {}\n{}", r.stdout, r.stderr);
        common::assert_same(&data, &cli.path().join("r-first/data"));
        let drill = cli.run(&["drill", "acme", "--json"]);
        assert_eq!(drill.code, 0, "{case}: {}", drill.stdout);

        // Nothing left to report, and prune is not confused by the index
        // entries that still name the lost pack. (A truncated pack is still
        // listed: no longer indexed, it is unreferenced, and prune removes it.)
        let check = cli.run(&["check", "acme", "--read-data", "--json"]);
        assert_eq!(
            check.json()["result"]["unreferenced_packs"],
            leftover,
            "{case}: {}",
            check.stdout
        );
        if !truncate {
            assert_eq!(check.code, 0, "{case}: {}", check.stdout);
        }
        cli.ok(&["prune", "acme"]);
        let check = cli.ok(&["check", "acme", "--read-data", "--json"]);
        assert_eq!(check.json()["result"]["faults"], serde_json::json!([]));
        let windows = cli.run_env(
            &["check", "acme", "--read-data", "--json"],
            &[("CUSTOS_CHECK_WINDOW", "100")],
        );
        assert_eq!(windows.code, 0, "{case}: {}", windows.stdout);
        let result = windows.json()["result"].clone();
        assert_eq!(result["faults"], serde_json::json!([]));
        assert_eq!(result["packs_read"], check.json()["result"]["packs_read"]);
        assert_eq!(check.json()["result"]["unreferenced_packs"], 0);
        // The next backup has nothing to store again.
        let b = cli.ok(&["backup", "acme", "--json"]);
        assert!(
            b.json()["result"]["warnings"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{case}: {}",
            b.stdout
        );
    }
}

/// The next thing an attacker (or a disk) does: data lost together with
/// its source. The new snapshot is whole; `check` keeps naming the lost pack
/// and every snapshot that needs it, `restore` of such a snapshot fails with
/// `missing_object`, and once those snapshots are forgotten, prune drops the
/// index entries of the lost pack and `check` passes.
#[test]
fn data_lost_with_its_source_stays_reported_until_forgotten() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    let first = one_snapshot(&cli, &data);
    // The biggest pack holds (some of) random.bin, the only large file.
    let lost = biggest(cli.object_paths("acme", "packs"));
    let lost_name = object_name(&lost);
    fs::remove_file(&lost).unwrap();
    fs::remove_file(data.join("dir/random.bin")).unwrap();

    cli.ok(&["backup", "acme"]);
    let r = restore_into(&cli, "latest", "r-latest");
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    common::assert_same(&data, &cli.path().join("r-latest/data"));

    let check = cli.run(&["check", "acme", "--json"]);
    assert_eq!(check.code, 1, "{}", check.stdout);
    assert_check_failed(&cli, "acme", &check);
    let faults = check.json()["result"]["faults"].clone();
    let names = |f: &serde_json::Value, what: &str| {
        f["kind"] == "missing_object" && f["object"].as_str().unwrap().contains(what)
    };
    let faults = faults.as_array().unwrap();
    assert!(faults.iter().any(|f| names(f, &lost_name)), "{faults:?}");
    assert!(faults.iter().any(|f| names(f, &first)), "{faults:?}");
    let r = restore_into(&cli, &first, "r-first");
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.json()["error"]["kind"], "missing_object");

    cli.ok(&["forget", "acme", "--keep-last", "1", "--prune"]);
    // No fault: no index entry names the lost pack any more (check reports
    // every indexed blob whose pack is missing).
    let check = cli.ok(&["check", "acme", "--read-data", "--json"]);
    assert_eq!(check.json()["result"]["faults"], serde_json::json!([]));
    assert_eq!(check.json()["result"]["snapshots"], 1);
}

/// `check` reads each tree blob once across snapshots (they share most of
/// their tree) and remembers what the files in it lack: a pack lost under
/// files every snapshot names is reported for every snapshot, with the same
/// count, though only the first snapshot's walk read those files' entries.
/// `prune` walks the trees the same way: what it keeps still restores.
#[test]
fn snapshots_sharing_tree_blobs_each_report_what_they_lost() {
    let cli = Cli::new();
    let data = cli.path().join("data");
    // Enough files for a tree of many blobs (about 64 KiB each), their data
    // spread over several packs of 4 MiB.
    let mut content = vec![0u8; 2048];
    for i in 0..8000 {
        let dir = data.join(format!("d{:02}", i % 40));
        fs::create_dir_all(&dir).unwrap();
        custos::util::fill_random(&mut content);
        fs::write(dir.join(format!("f{i:05}")), &content).unwrap();
    }
    cli.policy("acme", &data);
    let policy = cli.path().join("policies/acme.toml");
    let text = fs::read_to_string(&policy).unwrap();
    fs::write(&policy, format!("{text}[backup]\npack_size = \"4MiB\"\n")).unwrap();
    fs::write(
        &policy,
        fs::read_to_string(&policy)
            .unwrap()
            .replace("keep_last = 2", "keep_last = 10"),
    )
    .unwrap();
    // Three snapshots, each adding one file: the same files, in trees that
    // differ only where the new file's entry goes.
    for n in 0..3 {
        fs::write(
            data.join(format!("d{:02}/new{n}", n * 13)),
            format!("new {n}"),
        )
        .unwrap();
        cli.ok(&["backup", "acme"]);
    }
    let packs = cli.object_paths("acme", "packs");
    assert!(packs.len() >= 4, "{packs:?}");
    // A pack of file data only (a lost tree blob fails a snapshot's walk
    // instead): try each until check says blobs were lost.
    let lost_message = |faults: &serde_json::Value| -> Vec<String> {
        faults
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["object"].as_str().unwrap().contains("snapshots/"))
            .map(|f| f["message"].as_str().unwrap().to_owned())
            .collect()
    };
    let aside = cli.path().join("aside");
    let mut found = None;
    for pack in packs {
        fs::rename(&pack, &aside).unwrap();
        let check = cli.run(&["check", "acme", "--json"]);
        assert_eq!(check.code, 1, "{}", check.stdout);
        let messages = lost_message(&check.json()["result"]["faults"]);
        if messages.len() == 3
            && messages
                .iter()
                .all(|m| m.contains("packs missing from the store"))
        {
            found = Some((pack, messages));
            break;
        }
        fs::rename(&aside, &pack).unwrap();
    }
    let (pack, messages) = found.expect("a pack of file data only");
    // The same count, in every snapshot.
    let count = |m: &str| m.split(' ').next().unwrap().parse::<usize>().unwrap();
    assert!(count(&messages[0]) > 10, "{messages:?}");
    assert!(
        messages.iter().all(|m| count(m) == count(&messages[0])),
        "{messages:?}"
    );

    // Put back, forget the first snapshot and prune (which walks the two
    // kept trees, the second mostly seen): both restore whole, and every
    // pack checks.
    fs::rename(&aside, &pack).unwrap();
    cli.ok(&["forget", "acme", "--keep-last", "2", "--prune"]);
    cli.ok(&["check", "acme", "--read-data"]);
    let r = restore_into(&cli, "latest", "r");
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    common::assert_same(&data, &cli.path().join("r/data"));
    let listed = cli.ok(&["snapshots", "acme", "--json"]).json()["result"].clone();
    let middle = listed["snapshots"][0]["id"].as_str().unwrap().to_owned();
    let r = restore_into(&cli, &middle, "r-middle");
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // The source as it was then: without the last file added.
    let relative = |root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        common::tree_contents(root)
            .into_iter()
            .map(|(p, bytes)| (p.strip_prefix(root).unwrap().to_owned(), bytes))
            .collect()
    };
    let mut then = relative(&data);
    then.retain(|(path, _)| path != Path::new("d26/new2"));
    assert_eq!(then.len(), 8002);
    assert!(then == relative(&cli.path().join("r-middle/data")));
}

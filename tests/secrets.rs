//! No key bytes anywhere they could leak: logs (at the most verbose level,
//! text and JSON), errors, `Debug` output, job reports, the state directory,
//! the store, temporary files. The test knows two secrets: the local CMK
//! material (from the key file) and the tenant data key (unwrapped from the
//! envelope through the library), and greps for each raw, in hex (both
//! cases) and in base64 (standard and URL-safe, with and without padding).
//!
//! Also: a loose `custos.toml` is warned about on every command (and key
//! files must be 0600, or the local provider refuses them).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use common::Cli;

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
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
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
    // The warning is printed by every command, at the default log level.
    for args in [vec!["backup", "acme"], vec!["audit", "verify"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .env_remove("CUSTOS_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("writable by group or others"),
            "{args:?}: {stderr}"
        );
    }
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o600)).unwrap();
    let r = cli.run_env(&["backup", "acme"], &[("CUSTOS_LOG", "warn")]);
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

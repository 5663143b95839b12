//! The `custos` binary with AWS KMS keys: a KMS endpoint that is down, wrong
//! credentials and a disabled key each give a clear error and a non-zero exit,
//! and store nothing unencrypted; the whole flow (backup, restore, check,
//! rotate, forget) runs on `s3://` + `aws-kms:` with LocalStack.
//!
//! Every child runs with a cleared environment plus static credentials and
//! `AWS_EC2_METADATA_DISABLED=true`: no request leaves 127.0.0.1.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::common::env;
use custos::keys::KeyProvider;
use custos::keys::aws_kms::{AwsKmsProvider, AwsKmsSettings};

const MARKER: &str = "PLAINTEXT-MARKER-custos-must-never-store-this";

struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl Setup {
    /// A custos.toml over `store` with `[aws]` pointing at `kms_endpoint`, and
    /// a policy of tenant "acme" under `key` backing up a small tree.
    fn new(store: &str, kms_endpoint: &str, key: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("secret.txt"), MARKER.repeat(200)).unwrap();
        let mut rnd = vec![0u8; 600_000];
        custos::util::fill_random(&mut rnd);
        std::fs::write(data.join("sub/random.bin"), rnd).unwrap();
        let s = Setup { dir, data };
        s.write_config(store, kms_endpoint);
        s.write_policy(key);
        s
    }

    fn write_config(&self, store: &str, kms_endpoint: &str) {
        let root = self.dir.path();
        let s3_endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| "http://127.0.0.1:4566".into());
        let cfg = format!(
            r#"store = "{store}"
state_dir = "{root}/state"
policies_dir = "{root}/policies"

[local_keys]
dir = "{root}/keys"

[aws]
region = "us-east-1"
kms_endpoint_url = "{kms_endpoint}"
s3_endpoint_url = "{s3_endpoint}"
allow_http = true
access_key_id = "test"
secret_access_key = "test"
"#,
            root = root.display()
        );
        let path = root.join("custos.toml");
        std::fs::write(&path, cfg).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn write_policy(&self, key: &str) {
        let dir = self.dir.path().join("policies");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("acme.toml"),
            format!(
                r#"tenant = "acme"
key = "{key}"

[[sources]]
type = "path"
name = "data"
path = "{}"
"#,
                self.data.display()
            ),
        )
        .unwrap();
    }

    fn custos(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(self.dir.path().join("custos.toml"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("CUSTOS_LOG", "info")
            .env("CUSTOS_LOG_FORMAT", "json")
            .output()
            .unwrap();
        eprintln!(
            "$ custos {}\nexit {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs with `--json` and returns the document.
    fn json(&self, args: &[&str]) -> (bool, serde_json::Value) {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.custos(&a);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(out.status.success(), v["ok"] == true);
        (out.status.success(), v)
    }
}

/// No file under `dir` contains the plaintext marker.
fn assert_no_plaintext_in_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A fake KMS on 127.0.0.1 that rejects every request the way AWS rejects
/// wrong credentials.
fn fake_kms_rejecting_credentials() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then the body by Content-Length.
            let body_start = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(start) = body_start else { continue };
            let head = String::from_utf8_lossy(&buf[..start]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < start + len {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = r#"{"__type":"UnrecognizedClientException","message":"The security token included in the request is invalid."}"#;
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: fake\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    format!("http://{addr}")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn kms_endpoint_down_is_a_clear_error_and_stores_nothing() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let s = Setup::new(
        &store.display().to_string(),
        &format!("http://127.0.0.1:{port}"),
        "aws-kms:alias/custos-acme",
    );
    let out = s.custos(&["backup", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unreachable") && err.contains(&port.to_string()),
        "{err}"
    );
    let (ok, v) = s.json(&["backup", "acme"]);
    assert!(!ok);
    assert_eq!(v["error"]["kind"], "kms_unreachable");
    assert_no_plaintext_in_dir(&store);
    // No envelope, no descriptor, no pack: the tenant was not created.
    assert!(
        !store.join("tenants/acme/tenant.json").exists()
            && !store.join("tenants/acme/packs").exists()
    );
}

#[test]
fn wrong_credentials_are_a_clear_error_and_store_nothing() {
    let endpoint = fake_kms_rejecting_credentials();
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let s = Setup::new(
        &store.display().to_string(),
        &endpoint,
        "aws-kms:alias/custos-acme",
    );
    let out = s.custos(&["backup", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("access to key aws-kms:alias/custos-acme denied")
            && err.contains("security token"),
        "{err}"
    );
    let (ok, v) = s.json(&["backup", "acme"]);
    assert!(!ok);
    assert_eq!(v["error"]["kind"], "key_unavailable");
    assert_no_plaintext_in_dir(&store);
    assert!(!store.join("tenants/acme/packs").exists());
}

fn kms_settings() -> AwsKmsSettings {
    AwsKmsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(
            env("AWS_ENDPOINT_URL_KMS")
                .or_else(|| env("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| "http://127.0.0.1:4566".into()),
        ),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        profile: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_kms_through_the_cli() {
    if env("CUSTOS_TEST_EMULATORS").as_deref() != Some("1") {
        eprintln!("skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)");
        return;
    }
    let moto = env("CUSTOS_EMULATOR").as_deref() == Some("moto");
    let settings = kms_settings();
    let kms = Arc::new(AwsKmsProvider::new(&settings).await.unwrap());
    let key_a = kms.create_test_key(None).await.unwrap();
    let key_b = kms.create_test_key(None).await.unwrap();
    let bucket = env("CUSTOS_TEST_S3_BUCKET").unwrap_or_else(|| "custos-test".into());
    let run = hex::encode(custos::util::random_bytes::<6>());
    let store_url = format!("s3://{bucket}/cli-{run}");
    let s = Setup::new(
        &store_url,
        settings.endpoint_url.as_deref().unwrap(),
        &key_a.to_string(),
    );
    let key_b2 = key_b.clone();
    let s = tokio::task::spawn_blocking(move || {
        let key_b = key_b2;
        let (ok, v) = s.json(&["store", "probe"]);
        assert!(ok, "{v}");
        assert_eq!(v["result"]["create_exclusive"], true);
        let (ok, v) = s.json(&["backup", "acme"]);
        assert!(ok, "{v}");
        let restore = |s: &Setup, name: &str| {
            let target = s.dir.path().join(name);
            let (ok, v) = s.json(&[
                "restore",
                "acme",
                "latest",
                "--target",
                target.to_str().unwrap(),
            ]);
            assert!(ok, "{v}");
            for f in ["secret.txt", "sub/random.bin"] {
                assert!(
                    std::fs::read(target.join("data").join(f)).unwrap()
                        == std::fs::read(s.data.join(f)).unwrap(),
                    "{f}"
                );
            }
        };
        restore(&s, "r1");
        let (ok, v) = s.json(&["check", "acme", "--read-data"]);
        assert!(ok, "{v}");

        let (ok, v) = s.json(&["rotate", "acme", "--cmk"]);
        assert!(ok, "{v}");
        assert_eq!(v["result"]["envelopes_rewrapped"], 1);
        restore(&s, "r2");
        let (ok, v) = s.json(&["rotate", "acme", "--new-epoch"]);
        assert!(ok, "{v}");
        let (ok, v) = s.json(&["backup", "acme"]);
        assert!(ok, "{v}");

        // Move to key B while the policy still names A (accepted for the move).
        let (ok, v) = s.json(&[
            "rotate",
            "acme",
            "--replace-cmk",
            &key_b.to_string(),
            "--dry-run",
        ]);
        assert!(ok, "{v}");
        assert_eq!(v["result"]["bytes_written"], 0);
        let (ok, v) = s.json(&["rotate", "acme", "--replace-cmk", &key_b.to_string()]);
        assert!(ok, "{v}");
        assert_eq!(v["result"]["envelopes_rewrapped"], 2);
        assert_eq!(v["result"]["envelopes_verified"], 2);
        // Afterwards a policy naming the old key is refused, and says what to do.
        let out = s.custos(&["backup", "acme"]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(
            err.contains("was moved from key") && err.contains(&format!("key = \"{key_b}\"")),
            "{err}"
        );
        s.write_policy(&key_b.to_string());
        let (ok, v) = s.json(&["tenant", "show", "acme"]);
        assert!(ok, "{v}");
        assert_eq!(v["result"]["rotation"]["keys"][1]["role"], "previous");
        assert_eq!(v["result"]["store_probe"]["create_exclusive"], true);
        s
    })
    .await
    .unwrap();

    // Nothing depends on key A any more.
    kms.disable(&key_a).await.unwrap();
    let s = tokio::task::spawn_blocking(move || {
        let (ok, v) = s.json(&["check", "acme", "--read-data"]);
        assert!(ok, "{v}");
        // Every snapshot restores, byte-identical.
        let (ok, v) = s.json(&["snapshots", "acme"]);
        assert!(ok, "{v}");
        let ids: Vec<String> = v["result"]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 2);
        for id in ids {
            let target = s.dir.path().join(format!("r3-{id}"));
            let (ok, v) = s.json(&["restore", "acme", &id, "--target", target.to_str().unwrap()]);
            assert!(ok, "{v}");
            assert!(
                std::fs::read(target.join("data/sub/random.bin")).unwrap()
                    == std::fs::read(s.data.join("sub/random.bin")).unwrap()
            );
        }
        let (ok, v) = s.json(&["forget", "acme", "--keep-last", "1", "--prune"]);
        assert!(ok, "{v}");
        let (ok, v) = s.json(&["check", "acme", "--read-data"]);
        assert!(ok, "{v}");
        s
    })
    .await
    .unwrap();

    if moto {
        eprintln!("SKIPPED (moto does not enforce KMS key states): disabled key");
        return;
    }
    // The tenant's key disabled: a clear error, exit 1, nothing stored.
    kms.disable(&key_b).await.unwrap();
    let store = custos::store::s3::open(
        &bucket,
        &format!("cli-{run}"),
        &custos::store::s3::S3Options {
            region: Some("us-east-1".into()),
            endpoint_url: settings.endpoint_url.clone(),
            allow_http: Some(true),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            session_token: None,
        },
    )
    .unwrap();
    let before = list(&store).await;
    let (s, v) = tokio::task::spawn_blocking(move || {
        std::fs::write(s.data.join("new.txt"), MARKER).unwrap();
        let (ok, v) = s.json(&["backup", "acme"]);
        assert!(!ok);
        (s, v)
    })
    .await
    .unwrap();
    assert_eq!(v["error"]["kind"], "key_unavailable", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("disabled"),
        "{v}"
    );
    // Nothing was stored for the tenant; the audit log's replica records the
    // refused backup, which is wanted.
    let tenant_objects = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|p| !p.starts_with("audit/"))
            .cloned()
            .collect()
    };
    let after = list(&store).await;
    assert_eq!(
        tenant_objects(&before),
        tenant_objects(&after),
        "nothing was stored"
    );
    // And no object anywhere (audit records included) holds plaintext.
    for path in after {
        let b = store
            .get(&object_store::path::Path::from(path.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            !b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext in {path}"
        );
    }
    drop(s);
}

use object_store::ObjectStoreExt;

async fn list(store: &custos::store::SharedStore) -> Vec<String> {
    use futures::StreamExt;
    let mut v: Vec<String> = store
        .list(None)
        .map(|m| m.unwrap().location.to_string())
        // A failed job is still recorded in the audit log (and its store replica).
        .filter(|p| {
            futures::future::ready(
                !p.ends_with("locks/lease") && !p.starts_with("probe/") && !p.starts_with("audit/"),
            )
        })
        .collect()
        .await;
    v.sort();
    v
}

#[test]
fn local_rotation_probe_show_and_restore_to_a_prefix_through_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let s = Setup::new(
        &store.display().to_string(),
        "http://127.0.0.1:9",
        "local:acme",
    );
    let (ok, v) = s.json(&["backup", "acme"]);
    assert!(ok, "{v}");
    let out = s.custos(&["rotate", "acme", "--cmk", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"]["key_version_before"], "1");
    assert_eq!(v["result"]["key_version_after"], "2");
    assert!(v["result"]["bytes_written"].as_u64().unwrap() > 0);
    // One `key.rotated` event, with the fields the README documents.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let rotated: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "key.rotated")
        .collect();
    assert_eq!(rotated.len(), 1, "{events:?}");
    let f = &rotated[0];
    assert_eq!(f["tenant"], "acme");
    assert_eq!(f["key"], "local:acme");
    assert_eq!(f["old_version"], "1");
    assert_eq!(f["new_version"], "2");
    assert_eq!(f["envelopes_rewrapped"], 1);
    assert!(f["duration_ms"].is_u64());
    // job.finished for job rotate.
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "job.finished" && e["job"] == "rotate")
    );

    // Human output of show and probe.
    let out = s.custos(&["tenant", "show", "acme"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("new epoch every 30d, next due"), "{text}");
    assert!(text.contains("conditional writes: ok"), "{text}");
    let out = s.custos(&["store", "probe"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("(cached)"));

    // Restore to a file:// prefix.
    let prefix = root.path().join("objects");
    std::fs::create_dir_all(&prefix).unwrap();
    let url = format!("file://{}/", prefix.display());
    let (ok, v) = s.json(&["restore", "acme", "latest", "--target-url", &url]);
    assert!(ok, "{v}");
    assert_eq!(v["result"]["files"], 2);
    assert!(
        std::fs::read(prefix.join("data/sub/random.bin")).unwrap()
            == std::fs::read(s.data.join("sub/random.bin")).unwrap()
    );
    let (ok, v) = s.json(&["restore", "acme", "latest", "--target-url", &url]);
    assert!(
        !ok && v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not empty")
    );
    // Neither or both of --target / --target-url is a usage error.
    let out = s.custos(&["restore", "acme", "latest"]);
    assert_eq!(out.status.code(), Some(2));
}

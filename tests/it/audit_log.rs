//! The audit log end to end: appends, tampering of every kind caught and
//! named, concurrent appenders (threads and processes), tail-cache rebuild,
//! replication to a store and verification of the store copy, the key file,
//! and offline inclusion evidence.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use custos::TenantId;
use custos::audit::log::{LOG_FILE, store_checkpoint_path, store_segment_path};
use custos::audit::verify::CheckpointInput;
use custos::audit::{
    AuditKey, AuditLog, AuditRecord, FaultKind, VerifierKey, VerifyReport, verify_dir, verify_log,
    verify_store,
};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::json;

fn key() -> AuditKey {
    AuditKey::from_seed(&[0x5a; 32])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A log of `n` records of mixed events and tenants.
async fn make_log(dir: &Path, n: u64) -> AuditLog {
    let log = AuditLog::open(dir, key(), None).unwrap();
    let acme = TenantId::new("acme").unwrap();
    for i in 0..n {
        let tenant = (i % 3 != 0).then_some(&acme);
        log.append(
            if i % 2 == 0 { "backup" } else { "check" },
            tenant,
            "test:runner",
            json!({"i": i, "key": "local:acme", "fingerprint": "0011223344556677"}),
        )
        .await
        .unwrap();
    }
    log
}

fn lines(dir: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(dir.join(LOG_FILE)).unwrap();
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(dir: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    fs::write(dir.join(LOG_FILE), out).unwrap();
}

fn verifier() -> VerifierKey {
    key().verifier().clone()
}

fn has(report: &VerifyReport, kind: FaultKind, seq: Option<u64>) -> bool {
    report
        .faults
        .iter()
        .any(|f| f.kind == kind && (seq.is_none() || f.seq == seq))
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 25).await;
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 25);
    assert_eq!(report.checkpoints_checked, 25);
    assert_eq!(report.latest_checkpoint, Some(25));
}

#[tokio::test]
async fn an_empty_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), key(), None).unwrap();
    assert!(verify_dir(dir.path(), &verifier()).unwrap().ok());
    let cp = log.sign_checkpoint().await.unwrap();
    assert_eq!(cp.size(), 0);
    assert!(verify_dir(dir.path(), &verifier()).unwrap().ok());
}

#[tokio::test]
async fn an_edited_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 10).await;
    let mut l = lines(dir.path());
    // Change one byte inside the details of record 4: "local:acme" -> "local:acmf".
    let text = String::from_utf8(l[4].clone()).unwrap();
    l[4] = text.replacen("local:acme", "local:acmf", 1).into_bytes();
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(!report.ok());
    assert!(
        has(&report, FaultKind::ChainBroken, Some(4)),
        "{:#?}",
        report.faults
    );
    assert!(
        has(&report, FaultKind::RootMismatch, Some(4)),
        "{:#?}",
        report.faults
    );
    assert!(
        report.faults.iter().all(|f| f.seq.is_none_or(|s| s == 4)),
        "only record 4 is blamed: {:#?}",
        report.faults
    );
    let first = &report.faults[0];
    assert!(first.message.contains("record 4"), "{}", first.message);
}

#[tokio::test]
async fn an_edit_of_the_last_record_is_named_by_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 6).await;
    let mut l = lines(dir.path());
    let text = String::from_utf8(l[5].clone()).unwrap();
    l[5] = text.replacen("test:runner", "test:runnex", 1).into_bytes();
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(
        has(&report, FaultKind::RootMismatch, Some(5)),
        "{:#?}",
        report.faults
    );
}

#[tokio::test]
async fn a_whitespace_edit_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 4).await;
    let mut l = lines(dir.path());
    let text = String::from_utf8(l[2].clone()).unwrap();
    l[2] = text.replacen("\"seq\":2", "\"seq\": 2", 1).into_bytes();
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(
        has(&report, FaultKind::NotCanonical, Some(2)),
        "{:#?}",
        report.faults
    );
    assert!(
        has(&report, FaultKind::ChainBroken, Some(2)),
        "{:#?}",
        report.faults
    );
}

#[tokio::test]
async fn a_removed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 10).await;
    let mut l = lines(dir.path());
    l.remove(6);
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(
        has(&report, FaultKind::Missing, Some(6)),
        "{:#?}",
        report.faults
    );
    let f = report
        .faults
        .iter()
        .find(|f| f.kind == FaultKind::Missing)
        .unwrap();
    assert!(f.message.contains("record 6 is missing"), "{}", f.message);
    // The checkpoints after it no longer match, and the last one covers more
    // records than the log holds.
    assert!(has(&report, FaultKind::RootMismatch, None));
    assert!(
        has(&report, FaultKind::Truncated, Some(9)),
        "{:#?}",
        report.faults
    );
}

#[tokio::test]
async fn a_removed_last_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 5).await;
    let mut l = lines(dir.path());
    l.pop();
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    let f = report
        .faults
        .iter()
        .find(|f| f.kind == FaultKind::Truncated)
        .unwrap();
    assert_eq!((f.seq, f.checkpoint), (Some(4), Some(5)));
    assert!(
        f.message.contains("records 4..4 were removed"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn swapped_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 10).await;
    let mut l = lines(dir.path());
    l.swap(3, 4);
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    let f = report
        .faults
        .iter()
        .find(|f| f.kind == FaultKind::OutOfOrder)
        .expect("an out-of-order fault");
    assert_eq!(f.seq, Some(3));
    assert!(f.message.contains("after record 4"), "{}", f.message);
    assert!(
        !has(&report, FaultKind::Missing, None),
        "{:#?}",
        report.faults
    );
    // The first checkpoint over the swapped lines names the line that moved.
    let root = report
        .faults
        .iter()
        .find(|f| f.kind == FaultKind::RootMismatch)
        .unwrap();
    assert_eq!((root.seq, root.checkpoint), (Some(4), Some(4)));
}

#[tokio::test]
async fn a_record_appended_without_signature_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 7).await;
    let mut l = lines(dir.path());
    // A perfectly chained record, but no signed checkpoint covers it.
    let forged = AuditRecord::new(
        7,
        "policy.change",
        None,
        "intruder",
        json!({}),
        hex::encode(custos::audit::record::line_hash(&l[6])),
    );
    l.push(forged.to_line());
    write_lines(dir.path(), &l);
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert_eq!(report.faults.len(), 1, "{:#?}", report.faults);
    let f = &report.faults[0];
    assert_eq!((f.kind, f.seq), (FaultKind::Unsigned, Some(7)));
    assert!(
        f.message.contains("appended without signature"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn a_checkpoint_with_a_bad_signature_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 8).await;
    let cp = dir.path().join("checkpoints/5");
    let text = fs::read_to_string(&cp).unwrap();
    // Flip one character of the base64 signature (keeping it base64).
    let (body, sig) = text.rsplit_once(' ').unwrap();
    let mut sig: Vec<char> = sig.chars().collect();
    sig[10] = if sig[10] == 'A' { 'B' } else { 'A' };
    fs::write(
        &cp,
        format!("{body} {}", sig.into_iter().collect::<String>()),
    )
    .unwrap();
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert_eq!(report.faults.len(), 1, "{:#?}", report.faults);
    let f = &report.faults[0];
    assert_eq!((f.kind, f.checkpoint), (FaultKind::BadSignature, Some(5)));
    assert!(f.message.contains("checkpoints/5"), "{}", f.message);

    // An edited checkpoint body (another root) fails its signature too.
    let cp7 = dir.path().join("checkpoints/7");
    let text = fs::read_to_string(&cp7).unwrap();
    let mut parts: Vec<&str> = text.splitn(4, '\n').collect();
    let fake_root = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
    parts[2] = &fake_root;
    fs::write(&cp7, parts.join("\n")).unwrap();
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(
        report
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::BadSignature && f.checkpoint == Some(7))
    );
}

#[tokio::test]
async fn the_wrong_public_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 3).await;
    let other = AuditKey::from_seed(&[1; 32]);
    let report = verify_dir(dir.path(), other.verifier()).unwrap();
    assert!(!report.ok());
    // The other key names another log: every checkpoint is for another origin.
    assert!(
        has(&report, FaultKind::WrongOrigin, None),
        "{:#?}",
        report.faults
    );
    assert!(has(&report, FaultKind::Unsigned, Some(0)));

    // Same name, other key (a forged verifier key text): not signed by it.
    let same_name = VerifierKey::new(
        key().name(),
        *AuditKey::from_seed(&[1; 32]).verifier().public_key(),
    )
    .unwrap();
    let report = verify_dir(dir.path(), &same_name).unwrap();
    assert!(
        has(&report, FaultKind::BadSignature, None),
        "{:#?}",
        report.faults
    );
    assert!(
        report
            .faults
            .iter()
            .any(|f| f.message.contains("right public key")),
        "{:#?}",
        report.faults
    );
}

#[test]
fn verify_log_accepts_lines_and_checkpoints_from_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(make_log(dir.path(), 4));
    let checkpoints = vec![CheckpointInput {
        label: "cp".into(),
        named_size: None,
        text: fs::read(dir.path().join("checkpoints/4")).unwrap(),
    }];
    let report = verify_log(lines(dir.path()), checkpoints, &verifier());
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.checkpoints_checked, 1);
}

#[test]
fn concurrent_appends_from_threads_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("audit.key");
    let audit = dir.path().join("audit");
    std::thread::scope(|s| {
        for t in 0..4 {
            let (keyfile, audit) = (&keyfile, &audit);
            s.spawn(move || {
                // Each thread opens its own log, like a separate process would.
                let key = AuditKey::load_or_create_with(keyfile, None).unwrap();
                let log = AuditLog::open(audit, key, None).unwrap();
                rt().block_on(async {
                    for i in 0..50 {
                        log.append("backup", None, &format!("thread-{t}"), json!({"i": i}))
                            .await
                            .unwrap();
                    }
                });
            });
        }
    });
    let key = AuditKey::load_or_create_with(&keyfile, None).unwrap();
    let report = verify_dir(&audit, key.verifier()).unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 200);
    let seqs: Vec<u64> = lines(&audit)
        .iter()
        .map(|l| AuditRecord::parse_line(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_through_one_shared_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), key(), None).unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    log.append("drill", None, &format!("task-{t}"), json!({"i": i}))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 100);
}

const CHILD_ENV: &str = "CUSTOS_AUDIT_TEST_CHILD_DIR";

/// Not a test on its own: the body of each child process of
/// `concurrent_appends_from_processes` (does nothing unless the variable is set).
#[test]
fn child_appender() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let key = AuditKey::load_or_create_with(&dir.join("audit.key"), None).unwrap();
    let log = AuditLog::open(&dir.join("audit"), key, None).unwrap();
    let me = std::process::id();
    rt().block_on(async {
        for i in 0..30 {
            log.append("backup", None, &format!("pid-{me}"), json!({"i": i}))
                .await
                .unwrap();
        }
    });
}

#[test]
fn concurrent_appends_from_processes_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                // The test's full name in the one test binary (tests/it/main.rs).
                .args([
                    "audit_log::child_appender",
                    "--exact",
                    "--test-threads=1",
                    "--quiet",
                ])
                .env(CHILD_ENV, dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let key = AuditKey::load_with(&dir.path().join("audit.key"), None).unwrap();
    let report = verify_dir(&dir.path().join("audit"), key.verifier()).unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 90);
    let actors: std::collections::BTreeSet<String> = lines(&dir.path().join("audit"))
        .iter()
        .map(|l| AuditRecord::parse_line(l).unwrap().actor)
        .collect();
    assert_eq!(actors.len(), 3, "three processes appended: {actors:?}");
}

#[tokio::test]
async fn the_tail_cache_is_rebuilt_when_missing_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), 12).await;
    let tail = dir.path().join("tail.json");
    let before = fs::read(&tail).unwrap();
    fs::remove_file(&tail).unwrap();
    assert_eq!(log.size().unwrap(), 12);
    assert_eq!(
        fs::read(&tail).unwrap(),
        before,
        "the rebuilt cache is identical"
    );

    fs::write(&tail, b"{not json").unwrap();
    let r = log.append("restore", None, "t", json!({})).await.unwrap();
    assert_eq!((r.seq, r.tree_size), (12, 13));
    // Reopening with no cache also works.
    fs::remove_file(&tail).unwrap();
    let again = AuditLog::open(dir.path(), key(), None).unwrap();
    again.append("restore", None, "t", json!({})).await.unwrap();
    let report = verify_dir(dir.path(), &verifier()).unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 14);

    // A rebuild refuses a log that no longer matches its checkpoints.
    let mut l = lines(dir.path());
    l.swap(1, 2);
    write_lines(dir.path(), &l);
    fs::remove_file(&tail).unwrap();
    let err = AuditLog::open(dir.path(), key(), None).unwrap_err();
    assert!(err.to_string().contains("audit verify"), "{err}");
}

/// A temporary directory on tmpfs when there is one: the 1000+ appends of the
/// segment test cost three fsyncs each, which tmpfs makes free.
fn fast_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

#[tokio::test]
async fn replication_to_a_store_and_verification_from_it() {
    let dir = fast_tempdir();
    let store: custos::store::SharedStore = Arc::new(object_store::memory::InMemory::new());
    let log = AuditLog::open(dir.path(), key(), Some(store.clone())).unwrap();
    for i in 0..1003u64 {
        log.append("check", None, "t", json!({"i": i}))
            .await
            .unwrap();
    }
    // Two segments: 0..999 and 1000..1002.
    let first = store
        .get(&store_segment_path(0))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 1000);
    let second = store
        .get(&store_segment_path(1000))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(second.iter().filter(|&&b| b == b'\n').count(), 3);
    assert!(store.head(&store_checkpoint_path(1003)).await.is_ok());

    let report = verify_store(&store, &verifier()).await.unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(
        (report.records, report.latest_checkpoint),
        (1003, Some(1003))
    );
    // Nothing lands under any tenant's prefix.
    let all: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap();
    assert!(
        all.iter()
            .all(|m| m.location.as_ref().starts_with("audit/"))
    );

    // Tampering with the store copy is caught.
    let mut edited = second.to_vec();
    let pos = edited.windows(3).position(|w| w == b"\"i\"").unwrap();
    edited[pos + 4] = b'9';
    store
        .put(&store_segment_path(1000), PutPayload::from(edited))
        .await
        .unwrap();
    let report = verify_store(&store, &verifier()).await.unwrap();
    assert!(!report.ok());
    assert!(
        report
            .faults
            .iter()
            .any(|f| f.seq == Some(1000) || f.seq == Some(1001)),
        "{:#?}",
        report.faults
    );
}

#[tokio::test]
async fn a_store_outage_does_not_fail_appends_and_is_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    fs::create_dir_all(&store_root).unwrap();
    // A file where the audit/ directory must go: every put fails.
    fs::write(store_root.join("audit"), b"in the way").unwrap();
    let store: custos::store::SharedStore =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&store_root).unwrap());
    let log = AuditLog::open(&dir.path().join("audit"), key(), Some(store.clone())).unwrap();
    for i in 0..3u64 {
        log.append("backup", None, "t", json!({"i": i}))
            .await
            .unwrap();
    }
    assert!(log.replicate().await.is_err(), "the store is still down");

    fs::remove_file(store_root.join("audit")).unwrap();
    log.append("backup", None, "t", json!({"i": 3}))
        .await
        .unwrap();
    let report = verify_store(&store, &verifier()).await.unwrap();
    assert!(report.ok(), "{:#?}", report.faults);
    assert_eq!(report.records, 4);
    assert_eq!(
        report.checkpoints_checked, 4,
        "missed checkpoints are uploaded too"
    );
}

#[test]
fn the_key_file_is_0600_and_a_0644_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/audit.key");
    let key = AuditKey::load_or_create_with(&path, None).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(key.public_key_text().starts_with(key.name()));
    VerifierKey::parse(&key.public_key_text()).unwrap();

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = AuditKey::load_or_create_with(&path, None).unwrap_err();
    assert!(err.to_string().contains("permissions 0644"), "{err}");
    assert_eq!(err.kind(), "invalid_config");
}

#[tokio::test]
async fn the_key_bytes_never_reach_the_log_checkpoints_or_store() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("audit.key");
    let key = AuditKey::load_or_create_with(&keyfile, None).unwrap();
    let seed = fs::read(&keyfile).unwrap();
    let store: custos::store::SharedStore = Arc::new(object_store::memory::InMemory::new());
    let audit = dir.path().join("audit");
    let log = AuditLog::open(&audit, key, Some(store.clone())).unwrap();
    for i in 0..5u64 {
        log.append("rotate", None, "t", json!({"i": i}))
            .await
            .unwrap();
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let needles: Vec<Vec<u8>> = vec![
        seed.clone(),
        hex::encode(&seed).into_bytes(),
        b64.encode(&seed).into_bytes(),
        b64.encode([&[1u8][..], &seed].concat()).into_bytes(),
    ];
    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in walk(&audit) {
        haystacks.push((entry.display().to_string(), fs::read(&entry).unwrap()));
    }
    let objects: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap();
    for m in objects {
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        haystacks.push((m.location.to_string(), bytes.to_vec()));
    }
    haystacks.push(("Debug".into(), format!("{log:?}").into_bytes()));
    assert!(haystacks.len() > 10);
    for (name, hay) in &haystacks {
        for n in &needles {
            assert!(
                !hay.windows(n.len()).any(|w| w == n.as_slice()),
                "key material in {name}"
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn inclusion_evidence_verifies_offline_with_only_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), 11).await;
    let vkey = log.key().public_key_text();
    for seq in [0, 5, 10] {
        let ev = log.evidence(seq).unwrap();
        assert_eq!((ev.leaf_index, ev.tree_size), (seq, 11));
        // Round trip through JSON, as in a certificate.
        let ev: custos::audit::InclusionEvidence =
            serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        let rec = ev.verify(&vkey).unwrap();
        assert_eq!(rec.seq, seq);
    }
    let ev = log.evidence(5).unwrap();

    let mut bad = ev.clone();
    bad.record = bad.record.replacen("local:acme", "local:acmf", 1);
    assert!(bad.verify(&vkey).is_err(), "edited record");

    let mut bad = ev.clone();
    bad.leaf_index = 6;
    assert!(bad.verify(&vkey).is_err(), "wrong index");

    let mut bad = ev.clone();
    bad.proof[0] = hex::encode([7u8; 32]);
    assert!(bad.verify(&vkey).is_err(), "wrong proof");

    let other = AuditKey::from_seed(&[9; 32]).public_key_text();
    assert!(ev.verify(&other).is_err(), "wrong key");

    // The checkpoint of an older size with a proof for it also verifies.
    let proof = log.inclusion_proof(2, 4).unwrap();
    let cp = log.checkpoint(4).unwrap();
    let line = &log.read_lines(4).unwrap()[2];
    custos::audit::verify_inclusion_offline(line, 2, &proof.hashes, cp.text(), &vkey).unwrap();
    assert!(
        custos::audit::verify_inclusion_offline(
            line,
            2,
            &proof.hashes,
            log.checkpoint(5).unwrap().text(),
            &vkey
        )
        .is_err()
    );
}

#[tokio::test]
async fn details_and_store_paths_are_what_the_docs_say() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), 1).await;
    let line = String::from_utf8(log.read_lines(1).unwrap().remove(0)).unwrap();
    assert!(line.starts_with("{\"seq\":0,\"time\":\""), "{line}");
    assert!(line.contains("\"event\":\"backup\",\"tenant\":null,\"actor\":\"test:runner\""));
    assert!(line.ends_with(&format!("\"prev\":\"{}\"}}", "0".repeat(64))));
    let cp = fs::read_to_string(dir.path().join("checkpoints/1")).unwrap();
    let mut it = cp.lines();
    assert_eq!(it.next(), Some(log.key().name()));
    assert_eq!(it.next(), Some("1"));
    assert_eq!(StorePath::from("audit/log").as_ref(), "audit/log");
}

// ---------------------------------------------------------------------------
// Through the binary: fail closed on audit, cuts of either copy, `--json`
// envelopes, replication leftovers.

use crate::common;
use crate::common::{Cli, Run};

/// An installation with tenant `acme` backed up once.
fn backed_up() -> Cli {
    let cli = Cli::new();
    let src = cli.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("hello.txt"), "hello\n".repeat(100)).unwrap();
    fs::write(src.join("sub/data"), b"tenant data").unwrap();
    cli.policy("acme", &src);
    cli.ok(&["backup", "acme"]);
    cli
}

fn state_audit(cli: &Cli) -> PathBuf {
    cli.path().join("state/audit")
}

fn events(cli: &Cli) -> Vec<serde_json::Value> {
    lines(&state_audit(cli))
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

fn snapshot_count(cli: &Cli) -> usize {
    cli.object_paths("acme", "snapshots").len()
}

/// The `--json` error of a failed command: (kind, message).
fn json_error(r: &Run) -> (String, String) {
    let doc = r.json();
    assert_eq!(doc["ok"], false, "{doc}");
    (
        doc["error"]["kind"].as_str().unwrap_or_default().to_owned(),
        doc["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Asserts that `args` (with `--json`) was refused for want of an audit
/// record, naming `cause`, and returns the message.
fn refused_for_audit(r: &Run, cause: &str) -> String {
    assert_ne!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let (kind, message) = json_error(r);
    assert_eq!(kind, "audit_unavailable", "{message}");
    assert!(message.contains(cause), "{message}");
    message
}

/// Restore, backup, listing and tenant init with an audit log that cannot
/// be appended to: each refused with `audit_unavailable`, nothing done.
fn assert_nothing_runs(cli: &Cli, run: impl Fn(&[&str]) -> Run, cause: &str) {
    let before = snapshot_count(cli);
    let r = run(&["backup", "acme", "--json"]);
    let message = refused_for_audit(&r, cause);
    assert!(message.contains("backup.begin"), "{message}");
    assert!(message.contains("did not start"), "{message}");
    assert_eq!(snapshot_count(cli), before, "no snapshot was written");

    let target = cli.path().join("restored");
    let r = run(&[
        "restore",
        "acme",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    refused_for_audit(&r, cause);
    let restored = fs::read_dir(&target).map(|d| d.count()).unwrap_or(0);
    assert_eq!(restored, 0, "no file was restored");

    refused_for_audit(&run(&["snapshots", "acme", "--json"]), cause);
    refused_for_audit(&run(&["check", "acme", "--json"]), cause);

    let r = run(&["tenant", "init", "beta", "--json"]);
    refused_for_audit(&r, cause);
    assert!(
        !cli.path().join("keys/beta.key").exists() && !cli.store().join("tenants/beta").exists(),
        "no key and no tenant were created"
    );
}

/// Runs custos with the state directory on a full file system: a private
/// tmpfs (in a user and mount namespace, so neither root nor a mount left
/// behind is needed) holding a copy of the state, its free space filled.
/// `None` where namespaces are not available.
fn run_with_full_state(cli: &Cli, args: &[&str]) -> Option<Run> {
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return None;
    }
    let copy = tempfile::tempdir().unwrap();
    let script = r#"set -e
umask 077
state="$1"; copy="$2"; shift 2
cp -a "$state/." "$copy/"
mount -t tmpfs -o size=4m,mode=0700 custos-full "$state"
cp -a "$copy/." "$state/"
dd if=/dev/zero of="$state/filler" bs=64k 2>/dev/null || true
exec "$@""#;
    let out = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(cli.path().join("state"))
        .arg(copy.path())
        .arg(env!("CARGO_BIN_EXE_custos"))
        .arg("--config")
        .arg(cli.path().join("custos.toml"))
        .args(args)
        .env("CUSTOS_LOG", "warn")
        .env("CUSTOS_LOG_FORMAT", "text")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .output()
        .expect("run unshare");
    Some(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Issue 12, item 6: with the state directory full, `backup` and `restore`
/// exited 0 and recorded nothing. Now nothing runs without its record.
#[test]
fn a_full_state_directory_stops_every_job() {
    let cli = backed_up();
    if run_with_full_state(&cli, &["audit", "verify"]).is_none() {
        eprintln!("skipped: user and mount namespaces (unshare -rm) are not available");
        return;
    }
    let message = refused_for_audit(
        &run_with_full_state(&cli, &["backup", "acme", "--json"]).unwrap(),
        "No space left on device",
    );
    assert!(
        message.contains("audit/pending"),
        "names the file: {message}"
    );
    assert_nothing_runs(
        &cli,
        |args| run_with_full_state(&cli, args).unwrap(),
        "No space left on device",
    );
    // With room again, the same installation works and its log verifies.
    cli.ok(&["backup", "acme"]);
    cli.ok(&["audit", "verify"]);
}

/// The same with an append that fails everywhere, root or not, namespaces
/// or not: the intent file cannot be replaced (a directory is in its way).
#[test]
fn an_audit_log_that_cannot_be_appended_to_stops_every_job() {
    let cli = backed_up();
    let records = events(&cli).len();
    let blocker = state_audit(&cli).join("pending");
    fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    assert_nothing_runs(&cli, |args| cli.run(args), "pending");
    assert_eq!(events(&cli).len(), records, "no record was written");
    fs::remove_dir_all(&blocker).unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["audit", "verify"]);
}

/// The log replaced by a symlink: to a same-size copy (so no size check
/// notices) or to /dev/null. custos writes its records nowhere but the
/// log file itself: every job is refused and the copy is not written to.
#[test]
fn an_audit_log_replaced_by_a_symlink_stops_every_job() {
    let cli = backed_up();
    let log = state_audit(&cli).join("log.jsonl");
    let real = state_audit(&cli).join("log.real");
    let copy = cli.path().join("log-copy.jsonl");
    fs::copy(&log, &copy).unwrap();
    fs::rename(&log, &real).unwrap();
    for target in [copy.as_path(), Path::new("/dev/null")] {
        std::os::unix::fs::symlink(target, &log).unwrap();
        let copied = fs::read(&copy).unwrap();
        let before = snapshot_count(&cli);
        let message = refused_for_audit(&cli.run(&["backup", "acme", "--json"]), "log.jsonl");
        assert!(message.contains("not a regular file"), "{message}");
        assert_eq!(snapshot_count(&cli), before, "no snapshot was written");
        refused_for_audit(&cli.run(&["snapshots", "acme", "--json"]), "log.jsonl");
        assert_eq!(fs::read(&copy).unwrap(), copied, "the copy was written to");
        fs::remove_file(&log).unwrap();
    }
    fs::rename(&real, &log).unwrap();
    cli.ok(&["backup", "acme"]);
    cli.ok(&["audit", "verify"]);
}

/// Every job and every read of tenant data is recorded before it starts and
/// after it ends; the end names its beginning.
#[test]
fn every_access_is_recorded_before_and_after() {
    let cli = backed_up();
    let target = cli.path().join("restored");
    cli.ok(&["snapshots", "acme"]);
    cli.ok(&["check", "acme"]);
    cli.ok(&[
        "restore",
        "acme",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    cli.ok(&["tenant", "show", "acme"]);
    let log = events(&cli);
    let names: Vec<&str> = log.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "tenant.init.begin",
            "tenant.init",
            "backup.begin",
            "backup.end",
            "snapshots.begin",
            "snapshots.end",
            "check.begin",
            "check.end",
            "restore.begin",
            "restore.end",
            "tenant.show.begin",
            "tenant.show.end",
        ]
    );
    for (i, e) in log.iter().enumerate() {
        let name = e["event"].as_str().unwrap();
        assert_eq!(e["tenant"], "acme");
        if name.ends_with(".end") {
            assert_eq!(e["details"]["begin_seq"], (i - 1) as u64, "{e}");
            assert_eq!(e["details"]["outcome"], "success", "{e}");
        }
    }
    cli.ok(&["audit", "verify"]);
}

/// A job that ran but whose end record cannot be written is an error that
/// says the job's effect is in place (its snapshot exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_end_cannot_be_recorded_says_what_it_did() {
    use custos::jobs::runner::{JobSpec, run_job};
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let ctx = custos::context::Context::embedded(dir.path()).unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let acme = TenantId::new("acme").unwrap();
    let key = custos::keys::KeyRef::local("acme").unwrap();
    let pending = dir.path().join("state/audit/pending");
    let spec = JobSpec {
        tenant: &acme,
        job: custos::report::JobKind::Backup,
        policy_key: None,
        init_with: Some(&key),
    };
    let run = run_job(&ctx, spec, |repo, lease, _| {
        let (src, pending) = (src.clone(), pending.clone());
        async move {
            let report = custos::jobs::backup::run(
                repo,
                lease,
                common::backup_options(&src),
                &custos::jobs::NoProgress,
            )
            .await;
            // The audit log breaks while the job runs.
            fs::create_dir_all(pending.join("in-the-way")).unwrap();
            report
        }
        .boxed()
    })
    .await;
    let Err(err) = run.result else {
        panic!("the missing end is an error")
    };
    assert_eq!(err.kind(), "audit_unavailable");
    let message = err.to_string();
    let snapshot = run.report.metrics.snapshot.clone().expect("the backup ran");
    assert!(message.contains("backup.end"), "{message}");
    assert!(message.contains("effect is in place"), "{message}");
    assert!(message.contains(&snapshot), "{message}");
    assert_eq!(run.report.error_kind, Some("audit_unavailable"));
    let snapshots = dir.path().join("store/tenants/acme/snapshots");
    assert_eq!(fs::read_dir(snapshots).unwrap().count(), 1);
}

fn remove_last_records(cli: &Cli, n: usize) {
    let audit = state_audit(cli);
    let mut l = lines(&audit);
    let size = l.len();
    l.truncate(size - n);
    write_lines(&audit, &l);
    for s in size - n + 1..=size {
        fs::remove_file(audit.join(format!("checkpoints/{s}"))).unwrap();
    }
}

fn faults_of(r: &Run) -> Vec<serde_json::Value> {
    r.json()["result"]["faults"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn has_cut(r: &Run, copy: &str) -> bool {
    faults_of(r).iter().any(|f| {
        f["kind"] == "cut"
            && f["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("the {copy} was cut")))
    })
}

/// Issue 12, item 5: the last records removed from the local log with their
/// checkpoints passed `audit verify`. The state's last append, the
/// replication marker and the store copy each still know them.
#[test]
fn a_local_log_cut_with_its_checkpoints_is_caught() {
    let cli = backed_up();
    cli.ok(&["check", "acme"]);
    remove_last_records(&cli, 2);
    let r = cli.run(&["audit", "verify", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (kind, message) = json_error(&r);
    assert_eq!(kind, "audit_verification_failed");
    assert!(message.contains("the local log was cut"), "{message}");
    assert!(has_cut(&r, "local log"), "{}", r.stdout);
    let checks = r.json()["result"]["cross_checks"].clone();
    for source in ["tail.json", "replicated.json", "store copy"] {
        assert!(
            checks
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["outcome"] == "cut"
                    && c["copy"] == "local log"
                    && c["against"].as_str().unwrap().contains(source)),
            "{source}: {checks:#}"
        );
    }
    let human = cli.run(&["audit", "verify"]);
    assert_eq!(human.code, 1);
    assert!(human.stdout.contains("FAULT"), "{}", human.stdout);
    assert!(
        human.stdout.contains("records 4..5 were removed"),
        "{}",
        human.stdout
    );

    // custos does not carry on from a log shorter than it remembers: no
    // job runs, and the error says why.
    let r = cli.run(&["backup", "acme", "--json"]);
    refused_for_audit(&r, "records were removed");

    // An intruder who knows about the state files removes them too: the
    // store copy still holds the records and their signed checkpoints.
    fs::remove_file(state_audit(&cli).join("tail.json")).unwrap();
    fs::remove_file(state_audit(&cli).join("replicated.json")).unwrap();
    let r = cli.run(&["audit", "verify", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(has_cut(&r, "local log"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("the store copy's latest signed checkpoint (6)"),
        "{}",
        r.stdout
    );
    // Without the store copy (and no witness) nothing is left that knows:
    // the limit docs/AUDIT.md states.
    let r = cli.run(&["audit", "verify", "--offline", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(
        r.json()["result"]["cross_checks"][0]["outcome"],
        "unavailable"
    );

    // Now custos cannot tell locally and appends again, but it never writes
    // over the store copy, which keeps the removed records: the two copies
    // now diverge, and verification says so.
    let segment = cli.store().join("audit/log/00000000000000000000.jsonl");
    let kept = fs::read(&segment).unwrap();
    cli.run(&["backup", "acme"]);
    assert_eq!(
        fs::read(&segment).unwrap(),
        kept,
        "the store copy is intact"
    );
    for args in [
        vec!["audit", "verify", "--json"],
        vec!["audit", "verify", "--from-store", "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(
            faults_of(&r)
                .iter()
                .any(|f| f["kind"] == "diverged" || f["kind"] == "cut"),
            "{args:?}: {}",
            r.stdout
        );
    }
}

/// Issue 12, item 5: the last record and its checkpoint removed from the
/// store copy passed `audit verify --from-store`. The replication marker
/// says how far the store copy reached.
#[test]
fn a_store_copy_cut_with_its_checkpoint_is_caught() {
    let cli = backed_up();
    let seg = cli.store().join("audit/log/00000000000000000000.jsonl");
    let text = fs::read(&seg).unwrap();
    let mut l: Vec<&[u8]> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let size = l.len();
    l.pop();
    fs::write(&seg, [l.join(&b'\n'), b"\n".to_vec()].concat()).unwrap();
    fs::remove_file(cli.store().join(format!("audit/checkpoints/{size:020}"))).unwrap();

    for args in [
        vec!["audit", "verify", "--from-store", "--json"],
        vec!["audit", "verify", "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(has_cut(&r, "store copy"), "{args:?}: {}", r.stdout);
        assert!(!has_cut(&r, "local log"), "{args:?}: {}", r.stdout);
        let (kind, _) = json_error(&r);
        assert_eq!(kind, "audit_verification_failed");
    }
}

/// A store copy that lags (replication failed for a while) is not a cut;
/// the next append catches it up.
#[test]
fn a_lagging_store_copy_is_not_a_cut() {
    let cli = backed_up();
    // The state of a replication that failed after the next job's records:
    // the store copy and its marker as they were before it.
    let audit = cli.store().join("audit");
    let marker = state_audit(&cli).join("replicated.json");
    let aside = cli.path().join("aside");
    copy_dir(&audit, &aside.join("audit"));
    let old_marker = fs::read(&marker).unwrap();
    cli.ok(&["check", "acme"]);
    fs::remove_dir_all(&audit).unwrap();
    copy_dir(&aside.join("audit"), &audit);
    fs::write(&marker, old_marker).unwrap();

    let r = cli.run(&["audit", "verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let checks = r.json()["result"]["cross_checks"].clone();
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["copy"] == "store copy" && c["outcome"] == "behind"),
        "{checks:#}"
    );
    cli.ok(&["audit", "verify", "--from-store"]);
    cli.ok(&["check", "acme"]);
    let r = cli.ok(&["audit", "verify", "--from-store", "--json"]);
    assert_eq!(r.json()["result"]["records"], 8);
    cli.ok(&["audit", "verify"]);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Both copies and the state cut together leave nothing inside this
/// installation that knows; a checkpoint kept elsewhere (a witness) does.
#[test]
fn a_witness_catches_what_every_copy_lost() {
    let cli = backed_up();
    cli.ok(&["check", "acme"]);
    let witness = cli.path().join("witness.checkpoint");
    fs::write(&witness, cli.ok(&["audit", "checkpoint"]).stdout).unwrap();
    let w = witness.to_str().unwrap();
    cli.ok(&["audit", "verify", "--witness", w]);

    // The intruder cuts everything: local log, state, store copy.
    let size = events(&cli).len();
    remove_last_records(&cli, 2);
    for f in ["tail.json", "replicated.json"] {
        fs::remove_file(state_audit(&cli).join(f)).unwrap();
    }
    let seg = cli.store().join("audit/log/00000000000000000000.jsonl");
    fs::copy(state_audit(&cli).join("log.jsonl"), &seg).unwrap();
    for s in size - 1..=size {
        fs::remove_file(cli.store().join(format!("audit/checkpoints/{s:020}"))).unwrap();
    }
    cli.ok(&["audit", "verify"]);
    cli.ok(&["audit", "verify", "--from-store"]);
    for args in [
        vec!["audit", "verify", "--witness", w, "--json"],
        vec!["audit", "verify", "--from-store", "--witness", w, "--json"],
    ] {
        let r = cli.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(has_cut(&r, "local log"), "{args:?}: {}", r.stdout);
    }
    // A witness that is not this log's checkpoint is a fault, not knowledge.
    let forged = cli.path().join("forged");
    fs::write(
        &forged,
        fs::read_to_string(&witness).unwrap().replace('\n', "\n\n"),
    )
    .unwrap();
    let r = cli.run(&[
        "audit",
        "verify",
        "--witness",
        forged.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
}

/// `audit verify --json` and `certificate verify --json` use the one
/// envelope: `{"ok": true, "result"}` / `{"ok": false, "error": {kind, message}}`.
#[test]
fn verify_commands_print_the_json_envelope() {
    let cli = backed_up();
    let r = cli.ok(&["audit", "verify", "--json"]);
    let doc = r.json();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["result"]["records"], 4);
    assert_eq!(doc["result"]["faults"], json!([]));
    assert!(doc.get("error").is_none());
    // An error before any report: the envelope without a result.
    let r = cli.run(&["audit", "verify", "--public-key", "/nonexistent", "--json"]);
    assert_eq!(r.code, 1);
    let (kind, _) = json_error(&r);
    assert_eq!(kind, "io_error");
    assert!(r.json().get("result").is_none());

    // Certificates: valid, then edited.
    let out = cli.path().join("cert.json");
    cli.ok(&[
        "shred",
        "acme",
        "--confirm",
        "acme",
        "--out",
        out.to_str().unwrap(),
    ]);
    let r = cli.ok(&["certificate", "verify", out.to_str().unwrap(), "--json"]);
    let doc = r.json();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["result"]["valid"], true);
    assert_eq!(doc["result"]["tenant"], "acme");
    let text = fs::read_to_string(&out).unwrap();
    let bad = cli.path().join("bad.json");
    fs::write(&bad, text.replacen("acme", "acmf", 1)).unwrap();
    let r = cli.run(&["certificate", "verify", bad.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 1);
    let (kind, message) = json_error(&r);
    assert_eq!(kind, "certificate_invalid");
    assert!(message.contains("bad.json"), "{message}");
    assert_eq!(r.json()["result"]["valid"], false);
    // Valid, but the shred no longer holds online: data is back in the prefix.
    let planted = cli.store().join("tenants/acme/packs/00");
    fs::create_dir_all(&planted).unwrap();
    fs::write(planted.join("planted"), b"x").unwrap();
    let r = cli.run(&[
        "certificate",
        "verify",
        out.to_str().unwrap(),
        "--online",
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (kind, message) = json_error(&r);
    assert_eq!(kind, "shred_verification_failed");
    assert!(message.contains("tenants/acme/"), "{message}");
    assert_eq!(r.json()["result"]["valid"], true);
    assert_eq!(r.json()["result"]["online"]["ok"], false);
}

/// Issue 12, item 11: a replication killed mid-upload to a local store left
/// `audit/log/…jsonl#1` (and `audit/checkpoints/…#1`) for good. The next
/// replication removes them.
#[test]
fn a_killed_replication_leaves_nothing_behind() {
    let cli = backed_up();
    let size = events(&cli).len();
    // What a kill in the middle of the next upload leaves: the segment and
    // the next checkpoint, staged and never renamed.
    let seg = cli.store().join("audit/log/00000000000000000000.jsonl#1");
    let cp = cli
        .store()
        .join(format!("audit/checkpoints/{:020}#1", size + 1));
    fs::write(&seg, b"{\"seq\":0,\"ti").unwrap();
    fs::write(&cp, b"custos/audit/").unwrap();
    cli.ok(&["check", "acme"]);
    assert!(!seg.exists(), "segment staging file left");
    assert!(!cp.exists(), "checkpoint staging file left");
    let mut left = Vec::new();
    for d in ["audit/log", "audit/checkpoints"] {
        for e in fs::read_dir(cli.store().join(d)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.contains('#') {
                left.push(name);
            }
        }
    }
    assert!(left.is_empty(), "{left:?}");
    cli.ok(&["audit", "verify", "--from-store"]);
}

/// `scan_from` streams records from any seq, starting at its segment (not
/// the log's beginning), and yields what `read_lines` reads; `read_line`
/// and `evidence` (which streams leaf hashes only) agree with them.
#[tokio::test]
async fn scanning_from_a_seq_yields_the_records_read_lines_reads() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2 * custos::audit::log::SEGMENT_RECORDS + 5;
    let log = make_log(dir.path(), n).await;
    let all = log.read_lines(n).unwrap();
    for from in [0, 999, 1000, 1001, n - 1, n] {
        let mut seen = Vec::new();
        let size = log
            .scan_from(from, |seq, line| {
                seen.push((seq, line.to_vec()));
                true
            })
            .unwrap();
        assert_eq!(size, n);
        let expected: Vec<(u64, Vec<u8>)> =
            (from..n).map(|s| (s, all[s as usize].clone())).collect();
        assert_eq!(seen, expected, "from {from}");
    }
    // Stopping early visits no more.
    let mut count = 0;
    log.scan_from(1500, |_, _| {
        count += 1;
        count < 3
    })
    .unwrap();
    assert_eq!(count, 3);
    assert_eq!(log.read_line(1234).unwrap().unwrap(), all[1234]);
    assert_eq!(log.read_line(n).unwrap(), None);
    let vkey = log.key().public_key_text();
    let ev = log.evidence(1234).unwrap();
    assert_eq!(ev.verify(&vkey).unwrap().seq, 1234);
}

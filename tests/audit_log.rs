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
                .args(["child_appender", "--exact", "--test-threads=1", "--quiet"])
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

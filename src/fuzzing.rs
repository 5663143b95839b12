//! Entry points for fuzzing every parser of stored or user-supplied data.
//!
//! Each function takes arbitrary bytes and feeds them to one parser; it must
//! never panic, hang or allocate without bound, whatever the bytes. The same
//! functions are called by the `cargo fuzz` targets in `fuzz/` (libFuzzer,
//! nightly flags) and by `tests/it/fuzz_corpus.rs`, which replays the committed
//! corpus on stable in every `cargo test`, so a crash once found stays fixed.
//!
//! Sealed objects (packs, index files, snapshots) are authenticated before
//! anything inside them is parsed, so random bytes stop at the header or the
//! tag. Those targets therefore fuzz two layers: the raw object as an attacker
//! with write access to the store would forge it, and the plaintext inside,
//! sealed with a fixed test key, as a buggy or hostile writer holding the key
//! could produce it.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::format::ids::{IndexId, PackId, SnapshotId};
use crate::format::seal::{ObjectKind, Sealer, seal_stream};
use crate::keys::SecretKey;
use crate::keys::derive::EpochKeys;
use crate::tenant::TenantId;

/// A fuzz entry point: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by the name its `fuzz/fuzz_targets/<name>.rs` and its
/// corpus directory `fuzz/corpus/<name>/` carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("pack", pack),
    ("index", index),
    ("snapshot", snapshot),
    ("envelope", envelope),
    ("descriptor", descriptor),
    ("tree_entry", tree_entry),
    ("blob_frame", blob_frame),
    ("policy", policy),
    ("config", config),
    ("audit_record", audit_record),
    ("checkpoint", checkpoint),
    ("certificate", certificate),
];

fn keys() -> &'static EpochKeys {
    static KEYS: OnceLock<EpochKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        EpochKeys::new(
            TenantId::new("fuzz").expect("valid"),
            1,
            SecretKey::from_bytes([7; 32]),
        )
    })
}

/// Splits off the first byte as a mode selector.
fn mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    }
}

/// Packs: the header and trailer as forged in the store, the directory
/// parser on its own, and a pack whose sealed directory is the input.
pub fn pack(data: &[u8]) {
    use crate::format::pack::{decode_directory, directory_range, open_pack};
    let (m, rest) = mode(data);
    match m % 3 {
        0 => {
            let _ = open_pack(keys(), &PackId([1; 32]), rest);
        }
        1 => {
            if rest.len() >= 12 {
                let len = u64::from_be_bytes(rest[..8].try_into().expect("8"));
                let dir = u32::from_be_bytes(rest[8..12].try_into().expect("4"));
                let _ = decode_directory(&rest[12..], len, dir);
            }
            if rest.len() >= 16 {
                let len = u64::from_be_bytes(rest[..8].try_into().expect("8"));
                let _ = directory_range(len, &rest[8..16]);
            }
        }
        _ => {
            // A pack of zero blobs whose directory plaintext is the input; the
            // trailer says one more blob than it holds when the input asks.
            let id = [2u8; 32];
            let sealer = Sealer::with_id(keys(), ObjectKind::Pack, id);
            let mut out = sealer.header_bytes().to_vec();
            let mut dir = rest.to_vec();
            sealer.seal_segment(0, true, &mut dir);
            let dir_len = dir.len() as u32;
            out.extend_from_slice(&dir);
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&dir_len.to_be_bytes());
            if let Ok((opener, entries)) = open_pack(keys(), &PackId(id), &out) {
                for e in &entries {
                    let (s, l) = (e.offset as usize, e.sealed_len as usize);
                    if let Some(sealed) = out.get(s..s + l) {
                        let _ = crate::format::pack::open_blob(&opener, keys(), e, sealed);
                    }
                }
            }
        }
    }
}

/// Index files: forged objects, and sealed plaintext (zstd-compressed when
/// the mode says so, raw otherwise so the fuzzer reaches the decoder).
pub fn index(data: &[u8]) {
    use crate::format::index::IndexFile;
    let (m, rest) = mode(data);
    if m % 2 == 0 {
        let _ = IndexFile::open(keys(), &IndexId([3; 32]), rest);
        return;
    }
    let compressed = if m % 4 == 1 {
        zstd::bulk::compress(rest, 1).expect("zstd on memory")
    } else {
        rest.to_vec()
    };
    let sealer = Sealer::new(keys(), ObjectKind::Index);
    let id = IndexId(*sealer.object_id());
    let sealed = seal_stream(&sealer, &compressed);
    let _ = IndexFile::open(keys(), &id, &sealed);
}

/// Snapshot manifests: forged objects, and sealed JSON documents.
pub fn snapshot(data: &[u8]) {
    use crate::format::snapshot::Snapshot;
    let (m, rest) = mode(data);
    let id = SnapshotId([4; 32]);
    if m % 2 == 0 {
        let _ = Snapshot::open(keys(), &id, rest);
        return;
    }
    let compressed = if m % 4 == 1 {
        zstd::bulk::compress(rest, 1).expect("zstd on memory")
    } else {
        rest.to_vec()
    };
    let sealed = seal_stream(
        &Sealer::with_id(keys(), ObjectKind::Snapshot, id.0),
        &compressed,
    );
    let _ = Snapshot::open(keys(), &id, &sealed);
}

/// Key envelopes (`keys/<epoch>`, JSON in the clear).
pub fn envelope(data: &[u8]) {
    if let Ok(e) = crate::format::envelope::Envelope::parse(data) {
        let _ = e.context();
        let _ = crate::format::envelope::Envelope::parse(&e.to_json());
    }
}

/// Tenant descriptors (`tenant.json`, JSON in the clear).
pub fn descriptor(data: &[u8]) {
    if let Ok(d) = crate::format::descriptor::Descriptor::parse(data) {
        let _ = d.live_epochs().count();
        let _ = crate::format::descriptor::Descriptor::parse(&d.to_json());
    }
}

/// One line of a tree blob.
pub fn tree_entry(data: &[u8]) {
    if let Ok(e) = crate::format::tree::Entry::from_json_line(data) {
        let mut line = Vec::new();
        e.to_json_line(&mut line);
        let again = crate::format::tree::Entry::from_json_line(&line);
        assert!(again.is_ok(), "an entry that parsed must parse again");
        let _ = e.display_path();
    }
}

/// A blob frame (encoding byte + raw or zstd payload) of a stated length;
/// the length comes from the first four bytes, as from a pack directory.
pub fn blob_frame(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let raw_len = u32::from_be_bytes(data[..4].try_into().expect("4"));
    let _ = crate::format::pack::decode_frame(&data[4..], raw_len);
}

/// A scratch directory per process for the text formats that are read from
/// files (their loaders report file:line).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("custos-fuzz-{}", std::process::id()));
        // Private, whatever the umask: the loaders refuse what others can write.
        crate::secure_fs::create_private_dir(&dir.join("policies")).expect("scratch dir");
        dir
    })
}

/// Writes a scratch file only its owner can write (the loaders refuse others).
fn write_private(file: &std::path::Path, data: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(file, data).is_ok()
        && std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).is_ok()
}

/// A tenant policy file (TOML text) over no defaults; a policy that
/// validates is then put through the time arithmetic of the jobs and the
/// daemon ([`policy_times`]): validation must refuse whatever would make them
/// panic (a `keep_within` of 300000 years once passed validation and panicked
/// `forget`).
pub fn policy(data: &[u8]) {
    let dir = scratch().join("policies");
    let file = dir.join("fuzz.toml");
    if write_private(&file, data)
        && let Ok(p) = crate::config::load_policy_file(&dir, std::path::Path::new("fuzz.toml"))
    {
        policy_times(&p, chrono::Utc::now(), &[]);
    }
}

/// Everything custos computes from a policy's durations and dates: which
/// snapshots retention keeps, the drill's random window, the rotation due
/// dates, the shred date, and the next slot of each scheduled job.
pub fn policy_times(
    p: &crate::config::Policy,
    now: chrono::DateTime<chrono::Utc>,
    snapshots: &[crate::format::snapshot::Snapshot],
) {
    use crate::daemon::registry::ScheduledJob;
    let _ = crate::jobs::forget::apply(&p.retention.rules, snapshots, now);
    let _ = p.deletion.shred_due_at();
    let _ = crate::jobs::drill::DrillOptions::from_policy(&p.drill);
    let d = crate::format::descriptor::Descriptor::new(p.tenant.clone(), p.key.clone(), now);
    let _ = crate::jobs::rotate::rotation_status(&d, &p.rotation, now);
    let _ = crate::jobs::rotate::due(&d, &p.rotation, now);
    for job in ScheduledJob::ALL {
        if let Some(when) = job.when(p) {
            let _ = crate::daemon::plan::next_slot(&when, None, now);
            let _ = when.next_after(now);
            let _ = when.period_after(now);
        }
    }
}

/// `custos.toml`.
pub fn config(data: &[u8]) {
    let file = scratch().join("custos.toml");
    if write_private(&file, data) {
        let _ = crate::config::Config::load(&file);
    }
}

/// One audit record line (strict canonical parse and the lenient one).
pub fn audit_record(data: &[u8]) {
    use crate::audit::record::AuditRecord;
    if let Ok(r) = AuditRecord::parse_line(data) {
        let _ = r.is_canonical(data);
        let _ = AuditRecord::parse_line(&r.to_line());
    }
    let _ = AuditRecord::from_line(data);
}

/// Signed notes, checkpoints and verifier keys (the C2SP formats an auditor
/// feeds to `custos audit verify`).
pub fn checkpoint(data: &[u8]) {
    use crate::audit::checkpoint::SignedCheckpoint;
    use crate::audit::note::{SignedNote, VerifierKey};
    static KEY: OnceLock<VerifierKey> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        VerifierKey::new("custos-fuzz", sk.verifying_key()).expect("valid name")
    });
    let (m, rest) = mode(data);
    match m % 3 {
        0 => {
            let _ = SignedCheckpoint::parse_unverified(rest);
            let _ = SignedCheckpoint::verify(rest, key);
        }
        1 => {
            if let Ok(n) = SignedNote::parse(rest) {
                let _ = n.verify(key);
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = VerifierKey::parse(text);
                let _ = crate::audit::checkpoint::Checkpoint::parse_body(text);
            }
        }
    }
}

/// Deletion certificates as an auditor receives them: the offline verifier
/// on the raw file, the canonical-JSON renderer, and a parsed body re-signed
/// with a fixed key, so the checks behind the signature (audit evidence,
/// cross-references) see arbitrary field values too.
pub fn certificate(data: &[u8]) {
    use crate::audit::key::AuditKey;
    use crate::jobs::shred::certificate::{canonical_json, parse_unverified, sign, verify};
    static KEY: OnceLock<(AuditKey, String)> = OnceLock::new();
    let (key, key_text) = KEY.get_or_init(|| {
        let key = AuditKey::from_seed(&[11; 32]);
        let text = key.public_key_text();
        (key, text)
    });
    let (m, rest) = mode(data);
    match m % 3 {
        0 => {
            let _ = verify(rest, key_text);
        }
        1 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = canonical_json(&v, m & 0x80 != 0);
            }
        }
        _ => {
            if let Ok(doc) = parse_unverified(rest) {
                let signed = sign(&doc.certificate, key);
                let _ = verify(&signed, key_text);
            }
        }
    }
}

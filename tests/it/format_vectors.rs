//! The test vectors of docs/FORMAT.md. Every deterministic value is computed
//! again here from the fixed inputs and compared with the block in the spec,
//! so the spec and the code cannot drift apart. Objects holding zstd output
//! (index, snapshot) are checked in the decoding direction, since compressed
//! bytes may differ between zstd versions while staying valid.
//!
//! `CUSTOS_UPDATE_VECTORS=1 cargo test --test it format_vectors::` rewrites the block.

use std::path::Path;

use custos::TenantId;
use custos::format::ids::{BlobId, IndexId, PackId, SnapshotId};
use custos::format::index::IndexFile;
use custos::format::pack::{BlobKind, PackWriter, open_blob, open_pack};
use custos::format::seal::{ObjectKind, Opener, Sealer, open_stream, seal_stream, tenant_tag};
use custos::format::snapshot::{ChunkerParams, SNAPSHOT_FORMAT, Snapshot, SourceRecord, Summary};
use custos::format::tree::{Entry, EntryKind};
use custos::keys::derive::EpochKeys;
use custos::keys::{SecretKey, WrapContext};
use serde_json::{Value, json};

const BEGIN: &str = "<!-- test-vectors:begin -->\n```json\n";
const END: &str = "```\n<!-- test-vectors:end -->";

fn seq(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start + i as u8)
}

fn keys() -> EpochKeys {
    EpochKeys::new(
        TenantId::new("acme").unwrap(),
        1,
        SecretKey::from_bytes(seq(0)),
    )
}

/// A zstd frame of 4096 × 'a', made once with the zstd 1.5 CLI at level 3 (with a content checksum).
const ZSTD_FRAME_HEX: &str = "28b52ffd04584d00001061610100fbf7011603162c89";

fn tree_lines() -> Vec<u8> {
    let file = Entry {
        path: b"docs/hello.txt".to_vec(),
        kind: EntryKind::File,
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000,
        uid: 1000,
        gid: 1000,
        size: 14 + 4096,
        blobs: vec![
            BlobId(keys().blob_id(b"hello, custos\n")),
            BlobId(keys().blob_id(&[b'a'; 4096])),
        ],
        target: None,
        hardlink: None,
        inode: 0,
        ctime_ns: 0,
    };
    let dir = Entry {
        path: b"docs".to_vec(),
        kind: EntryKind::Dir,
        mode: 0o755,
        size: 0,
        blobs: vec![],
        ..file.clone()
    };
    let mut out = Vec::new();
    dir.to_json_line(&mut out);
    file.to_json_line(&mut out);
    out
}

/// Everything that is a pure function of the fixed inputs.
fn deterministic() -> Value {
    let k = keys();

    let seal_id = seq(0x20);
    let sk = k.seal_keys(b'I', &seal_id);
    let stream_plain: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let stream_obj = seal_stream(
        &Sealer::with_id(&k, ObjectKind::Index, seal_id),
        &stream_plain,
    );

    let hello = b"hello, custos\n".to_vec();
    let aaaa = vec![b'a'; 4096];
    let tree = tree_lines();
    let mut frames = [
        [vec![0u8], hello.clone()].concat(),
        [vec![1u8], hex::decode(ZSTD_FRAME_HEX).unwrap()].concat(),
        [vec![0u8], tree.clone()].concat(),
    ];
    let raws = [hello, aaaa, tree];
    let kinds = [BlobKind::Data, BlobKind::Data, BlobKind::Tree];
    let pack_id = PackId(seq(0x40));
    let mut w = PackWriter::with_id(&k, pack_id, 1 << 16);
    let mut blobs = Vec::new();
    for ((frame, raw), kind) in frames.iter_mut().zip(&raws).zip(kinds) {
        let frame_hex = h(&*frame);
        let e = w.add(BlobId(k.blob_id(raw)), kind, raw.len() as u32, frame);
        blobs.push(json!({
            "raw_hex": h(raw), "frame_hex": frame_hex, "id": e.id.to_hex(), "kind": kind,
            "segment": e.segment, "offset": e.offset, "sealed_len": e.sealed_len, "raw_len": e.raw_len,
        }));
    }
    let pack = w.finish();

    let material = seq(0x60);
    let ctx = WrapContext::tdk(&TenantId::new("acme").unwrap(), 1);
    let nonce: [u8; 12] = std::array::from_fn(|i| 0x80 + i as u8);
    let wrapped = custos::keys::local::wrap_with_nonce("acme", 1, &material, k.tdk(), &ctx, nonce);

    json!({
        "inputs": { "tenant": "acme", "epoch": 1, "tdk": h(seq(0)) },
        "derived": {
            "fingerprint": k.tdk().fingerprint(),
            "chunk_id_key": h(k.chunk_id_key().expose()),
            "chunker_seed": k.chunker_seed().to_string(),
            "tenant_tag": h(tenant_tag(k.tenant())),
        },
        "sealed_stream": {
            "kind": "I", "object_id": h(seal_id), "seal_key": h(*sk.key), "commitment": h(sk.commitment),
            "plaintext": "bytes i % 251 for i in 0..70000",
            "object_sha256": sha256_hex(&stream_obj),
            "object_len": stream_obj.len(),
            "object_head_hex": h(&stream_obj[..84 + 32]),
        },
        "pack": { "pack_id": pack_id.to_hex(), "blobs": blobs, "pack_hex": h(&pack.bytes) },
        "local_wrap": {
            "key_name": "acme", "version": 1, "material": h(material), "nonce": h(nonce),
            "context_canonical_hex": h(ctx.canonical_bytes()), "wrapped_hex": h(&wrapped),
        },
    })
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn snapshot_document() -> Snapshot {
    Snapshot {
        format: SNAPSHOT_FORMAT,
        id: SnapshotId(seq(0xa0)),
        tenant: TenantId::new("acme").unwrap(),
        epoch: 1,
        time: "2026-11-26T00:00:00Z".parse().unwrap(),
        hostname: "vectors".into(),
        parent: None,
        tags: vec![],
        sources: vec![SourceRecord {
            name: "docs".into(),
            kind: "path".into(),
            origin: "/srv/docs".into(),
        }],
        tree: vec![BlobId(keys().blob_id(&tree_lines()))],
        summary: Summary {
            files: 1,
            dirs: 1,
            bytes_in: 4110,
            ..Default::default()
        },
        chunker: ChunkerParams {
            min: 524288,
            avg: 1048576,
            max: 8388608,
        },
        custos_version: "vectors".into(),
    }
}

fn index_file(pack: &Value) -> IndexFile {
    let entries = pack["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| custos::format::pack::PackEntry {
            id: BlobId::from_hex(b["id"].as_str().unwrap()).unwrap(),
            kind: serde_json::from_value(b["kind"].clone()).unwrap(),
            segment: b["segment"].as_u64().unwrap() as u32,
            offset: b["offset"].as_u64().unwrap() as u32,
            sealed_len: b["sealed_len"].as_u64().unwrap() as u32,
            raw_len: b["raw_len"].as_u64().unwrap() as u32,
        })
        .collect();
    IndexFile {
        packs: vec![(
            PackId::from_hex(pack["pack_id"].as_str().unwrap()).unwrap(),
            entries,
        )],
    }
}

fn spec_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md")
}

#[test]
fn spec_vectors_match_the_code() {
    let k = keys();
    let mut fresh = deterministic();
    let spec = std::fs::read_to_string(spec_path()).expect("docs/FORMAT.md");
    let (start, end) = (
        spec.find(BEGIN).expect("vectors block") + BEGIN.len(),
        spec.find(END).expect("vectors end"),
    );
    let doc: Value = serde_json::from_str(&spec[start..end]).expect("vectors block is JSON");

    // Decoding direction: index and snapshot objects in the spec open to the expected content.
    let index_ok = |v: &Value| -> bool {
        let (Some(id), Some(obj)) = (v["index_id"].as_str(), v["object_hex"].as_str()) else {
            return false;
        };
        let id = IndexId::from_hex(id).unwrap();
        IndexFile::open(&k, &id, &hex::decode(obj).unwrap()).ok()
            == Some(index_file(&fresh["pack"]))
    };
    let snap_ok = |v: &Value| -> bool {
        let Some(obj) = v["object_hex"].as_str() else {
            return false;
        };
        Snapshot::open(&k, &SnapshotId(seq(0xa0)), &hex::decode(obj).unwrap()).ok()
            == Some(snapshot_document())
    };
    if std::env::var("CUSTOS_UPDATE_VECTORS").is_ok() {
        fresh["index"] = if index_ok(&doc["index"]) {
            doc["index"].clone()
        } else {
            let (id, bytes) = index_file(&fresh["pack"]).seal(&k);
            json!({ "index_id": id.to_hex(), "object_hex": hex::encode(bytes) })
        };
        fresh["snapshot"] = if snap_ok(&doc["snapshot"]) {
            doc["snapshot"].clone()
        } else {
            json!({ "id": hex::encode(seq(0xa0)), "object_hex": hex::encode(snapshot_document().seal(&k)), "document": snapshot_document() })
        };
        let block = serde_json::to_string_pretty(&fresh).unwrap() + "\n";
        std::fs::write(
            spec_path(),
            format!("{}{}{}", &spec[..start], block, &spec[end..]),
        )
        .unwrap();
        return;
    }
    for field in ["inputs", "derived", "sealed_stream", "pack", "local_wrap"] {
        assert_eq!(
            doc[field], fresh[field],
            "vector {field:?} of docs/FORMAT.md differs from the code"
        );
    }
    assert!(
        index_ok(&doc["index"]),
        "the index vector does not open to the pack's entries"
    );
    assert!(
        snap_ok(&doc["snapshot"]),
        "the snapshot vector does not open to its document"
    );
    assert_eq!(
        doc["snapshot"]["document"],
        serde_json::to_value(snapshot_document()).unwrap()
    );
}

#[test]
fn vector_objects_open_with_the_public_primitives() {
    // The pack of the vectors opens and yields its blobs: what an independent reader does.
    let k = keys();
    let v = deterministic();
    let bytes = hex::decode(v["pack"]["pack_hex"].as_str().unwrap()).unwrap();
    let id = PackId(seq(0x40));
    let (opener, entries) = open_pack(&k, &id, &bytes).unwrap();
    let raws: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| {
            open_blob(
                &opener,
                &k,
                e,
                &bytes[e.offset as usize..(e.offset + e.sealed_len) as usize],
            )
            .unwrap()
        })
        .collect();
    assert_eq!(raws[0], b"hello, custos\n");
    assert_eq!(raws[1], vec![b'a'; 4096]);
    let o = Opener::new(&k, ObjectKind::Pack, Some(&id.0), &bytes).unwrap();
    assert_eq!(o.header().epoch, 1);
    let _ = open_stream;
}

fn h(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}

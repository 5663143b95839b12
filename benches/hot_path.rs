//! Micro-benchmarks of the backup hot path, on in-memory data:
//! chunking (keyed FastCDC), keyed hashing (BLAKE3 blob ids), compression
//! (zstd 3 with the incompressibility test), encryption (AES-256-GCM segment
//! sealing), and the whole write pipeline (chunk, hash, pack, seal, upload to
//! an in-memory store). Run: `cargo bench --bench hot_path`.
//! Throughput is reported per input byte; the scripts/bench.sh harness is
//! what compares custos with restic and borg end to end.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use custos::format::ids::BlobId;
use custos::format::pack::{BlobKind, encode_frame};
use custos::format::seal::{ObjectKind, Sealer};
use custos::keys::SecretKey;
use custos::keys::derive::EpochKeys;
use custos::pipeline::chunker::{Chunker, DATA_CHUNKS};
use custos::pipeline::packer::{Packer, PackerConfig, Work};
use custos::store::TenantStore;
use custos::tenant::TenantId;

const MIB: usize = 1 << 20;

fn keys() -> Arc<EpochKeys> {
    Arc::new(EpochKeys::new(
        TenantId::new("bench").unwrap(),
        1,
        SecretKey::from_bytes([3; 32]),
    ))
}

/// Incompressible bytes (a fixed xorshift stream: same data every run).
fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Log-like text: compresses about 5–8× with zstd 3, like the dataset's logs.
fn logs(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 200);
    let mut i = 0u64;
    while v.len() < len {
        i += 1;
        v.extend_from_slice(
            format!(
                "2026-11-26T21:{:02}:{:02}.{:06}Z INFO request id={:016x} path=/api/v1/items/{} status={} took={}ms\n",
                (i / 60) % 60,
                i % 60,
                i.wrapping_mul(7919) % 1_000_000,
                i.wrapping_mul(0x9e37_79b9),
                i % 5000,
                [200, 200, 200, 404, 500][(i % 5) as usize],
                i % 250
            )
            .as_bytes(),
        );
    }
    v.truncate(len);
    v
}

/// The dataset's mix: half log text, half random, in 1 MiB runs.
fn mixed(len: usize) -> Vec<u8> {
    let (l, r) = (logs(len / 2), random(len / 2));
    let mut v = Vec::with_capacity(len);
    for (a, b) in l.chunks(MIB).zip(r.chunks(MIB)) {
        v.extend_from_slice(a);
        v.extend_from_slice(b);
    }
    v
}

fn chunking(c: &mut Criterion) {
    let k = keys();
    let data = random(64 * MIB);
    let chunker = Chunker::new(DATA_CHUNKS, k.chunker_seed());
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc_keyed_64MiB", |b| {
        let mut buf = Vec::new();
        b.iter(|| {
            let mut n = 0usize;
            chunker
                .chunk_reader(&data[..], &mut buf, |chunk| {
                    n += chunk.len();
                    Ok::<_, ()>(())
                })
                .unwrap();
            black_box(n)
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let k = keys();
    let data = random(MIB);
    let mut g = c.benchmark_group("keyed_hashing");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("blake3_blob_id_1MiB", |b| {
        b.iter(|| black_box(k.blob_id(&data)))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("compression");
    // 1 MiB: a typical data chunk; 16 KiB: a small file, one blob.
    for (name, data) in [
        ("logs_1MiB", logs(MIB)),
        ("random_1MiB", random(MIB)),
        ("logs_16KiB", logs(16 << 10)),
    ] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("zstd3_frame", name), &data, |b, d| {
            let mut out = Vec::new();
            b.iter(|| black_box(encode_frame(d, 3, &mut out)))
        });
    }
    g.finish();
}

fn encryption(c: &mut Criterion) {
    let k = keys();
    let sealer = Sealer::new(&k, ObjectKind::Pack);
    let data = random(MIB);
    let mut g = c.benchmark_group("encryption");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("aes256gcm_segment_1MiB", |b| {
        let mut buf = Vec::with_capacity(MIB + 64);
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&data);
            sealer.seal_segment(1, false, &mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

/// Chunk, hash, deduplicate, compress, seal and upload 64 MiB of mixed data
/// to an in-memory store: what `backup` does per byte, without the disk.
fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let k = keys();
    let data = mixed(64 * MIB);
    let chunker = Chunker::new(DATA_CHUNKS, k.chunker_seed());
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("backup_in_memory_64MiB", |b| {
        let mut buf = Vec::new();
        b.iter(|| {
            let store =
                TenantStore::new(Arc::new(object_store::memory::InMemory::new()), k.tenant());
            let packer = Packer::start(
                k.clone(),
                store,
                Default::default(),
                PackerConfig::default(),
                None,
                rt.handle(),
            );
            chunker
                .chunk_reader(&data[..], &mut buf, |chunk| {
                    let id = BlobId(k.blob_id(chunk));
                    if packer.claim(&id) {
                        packer.add(Work::Raw {
                            id,
                            kind: BlobKind::Data,
                            data: chunk.to_vec(),
                        })?;
                    }
                    Ok::<_, custos::Error>(())
                })
                .map_err(|_| "chunking failed")
                .unwrap();
            black_box(rt.block_on(packer.finish()).unwrap().bytes_stored)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    compression,
    encryption,
    pipeline
);
criterion_main!(benches);

//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every
//! crash reproducer (`fuzz/regressions/<target>/`) through the same entry
//! points the `cargo fuzz` targets call (`custos::fuzzing`). This runs on
//! stable in every `cargo test`: whatever the fuzzer once found stays fixed,
//! without nightly flags or libFuzzer.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use std::path::Path;

fn replay(dir: &Path, f: fn(&[u8])) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
    files.sort();
    for p in files {
        let data = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{} panics its parser", p.display());
        n += 1;
    }
    n
}

#[test]
fn the_committed_corpus_and_regressions_parse_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, f) in custos::fuzzing::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .exists(),
            "fuzz target {name} has no fuzz/fuzz_targets/{name}.rs"
        );
        let corpus = replay(&root.join("corpus").join(name), *f);
        assert!(corpus > 0, "fuzz/corpus/{name}/ is empty");
        total += corpus + replay(&root.join("regressions").join(name), *f);
    }
    eprintln!("replayed {total} inputs");
}

#[test]
fn empty_and_tiny_inputs_are_harmless() {
    for (_, f) in custos::fuzzing::TARGETS {
        for input in [&b""[..], b"\0", b"\xff", b"{}", b"[", b"\n\n"] {
            f(input);
        }
    }
}

/// Writes the seed corpus from a real backup (run by hand:
/// `cargo test --test it -- --ignored fuzz_corpus::write_seed_corpus`), then
/// minimise with `scripts/fuzz.sh --minimise`.
#[test]
#[ignore]
fn write_seed_corpus() {
    use crate::common;
    use std::fs;
    let cli = common::Cli::new();
    let data = cli.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("a.txt"), "hello\n".repeat(100)).unwrap();
    fs::write(data.join("b.bin"), [1u8, 2, 3, 4]).unwrap();
    std::os::unix::fs::symlink("a.txt", data.join("l")).unwrap();
    cli.policy("fuzz", &data);
    cli.ok(&["backup", "fuzz"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), bytes).unwrap();
    };
    let with_mode = |m: u8, b: &[u8]| [&[m][..], b].concat();
    let objects = cli.objects("fuzz");
    for (path, bytes) in &objects {
        if path == "tenant.json" {
            put("descriptor", "seed-descriptor", bytes);
        } else if path.starts_with("keys/") {
            put("envelope", "seed-envelope", bytes);
        } else if path.starts_with("packs/") && bytes.len() < 64 << 10 {
            put("pack", "seed-pack-raw", &with_mode(0, bytes));
        } else if path.starts_with("index/") {
            put("index", "seed-index-raw", &with_mode(0, bytes));
        } else if path.starts_with("snapshots/") {
            put("snapshot", "seed-snapshot-raw", &with_mode(0, bytes));
        }
    }
    // Plaintext layers (sealed by the target with its fixed key).
    put("pack", "seed-pack-dir-empty", &[2, 0, 0, 0, 0]);
    let mut dir = vec![1u8];
    dir.extend_from_slice(&(84u64 + 17 + 16 + 4 + 45 + 8).to_be_bytes());
    dir.extend_from_slice(&(16u32 + 4 + 45).to_be_bytes());
    dir.extend_from_slice(&1u32.to_be_bytes());
    dir.extend_from_slice(&[5; 32]);
    dir.push(0);
    dir.extend_from_slice(&84u32.to_be_bytes());
    dir.extend_from_slice(&17u32.to_be_bytes());
    dir.extend_from_slice(&1u32.to_be_bytes());
    put("pack", "seed-pack-dir-one", &dir);
    let mut idx = vec![3u8];
    idx.extend_from_slice(&[6; 32]);
    idx.extend_from_slice(&1u32.to_be_bytes());
    idx.extend_from_slice(&[5; 32]);
    idx.push(0);
    for v in [0u32, 84, 17, 1] {
        idx.extend_from_slice(&v.to_be_bytes());
    }
    put("index", "seed-index-plain", &idx);
    let snap = br#"{"format":1,"id":"0404040404040404040404040404040404040404040404040404040404040404","tenant":"fuzz","epoch":1,"time":"2026-01-01T00:00:00Z","hostname":"h","parent":null,"tags":["t"],"sources":[{"name":"data","kind":"path","origin":"/data"}],"tree":["0505050505050505050505050505050505050505050505050505050505050505"],"summary":{},"chunker":{"min":1,"avg":2,"max":3},"custos_version":"0.1.0"}"#;
    put("snapshot", "seed-snapshot-plain", &with_mode(3, snap));
    put(
        "tree_entry",
        "seed-file",
        br#"{"path":"data/a.txt","kind":"file","mode":420,"mtime_ns":1,"uid":0,"gid":0,"size":600,"blobs":["0505050505050505050505050505050505050505050505050505050505050505"]}"#,
    );
    put(
        "tree_entry",
        "seed-link",
        br#"{"path":"data/l","kind":"symlink","mode":511,"mtime_ns":1,"uid":0,"gid":0,"target":"a.txt"}"#,
    );
    let mut frame = 600u32.to_be_bytes().to_vec();
    frame.push(1);
    frame.extend(zstd::bulk::compress(&b"hello\n".repeat(100), 3).unwrap());
    put("blob_frame", "seed-zstd", &frame);
    put("blob_frame", "seed-raw", &[0, 0, 0, 3, 0, b'a', b'b', b'c']);
    for p in ["policies/example.toml", "policies/sqlite-demo.toml"] {
        let text = fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap();
        put("policy", p.rsplit('/').next().unwrap(), &text);
    }
    put(
        "config",
        "seed-custos.toml",
        &fs::read(cli.path().join("custos.toml")).unwrap(),
    );
    // The audit log this backup wrote: records and checkpoints.
    let mut stack = vec![cli.path().join("state/audit")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = fs::read(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            eprintln!("audit file {name}: {} bytes", bytes.len());
            if bytes.starts_with(b"{") {
                for (i, line) in bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .take(2)
                    .enumerate()
                {
                    put("audit_record", &format!("seed-{name}-{i}"), line);
                }
            } else if bytes.contains(&b'\n') {
                put("checkpoint", &format!("seed-{name}"), &with_mode(0, &bytes));
                put(
                    "checkpoint",
                    &format!("seed-note-{name}"),
                    &with_mode(1, &bytes),
                );
            }
        }
    }
    let pk = cli.ok(&["audit", "public-key"]).stdout;
    put(
        "checkpoint",
        "seed-verifier-key",
        &with_mode(2, pk.as_bytes()),
    );
}

/// A brief fuzzing run on stable, in every `cargo test`: each target gets
/// seeded mutations (bit flips, byte overwrites with boundary values,
/// truncations, duplicated and deleted ranges) of every corpus file. The
/// long runs are libFuzzer's (`scripts/fuzz.sh`); this keeps CI exercising
/// each parser beyond the fixed corpus. `CUSTOS_FUZZ_MUTATIONS` (per file,
/// default 2000) and `CUSTOS_FUZZ_SEED` reproduce a run.
#[test]
fn each_target_survives_seeded_mutations_of_its_corpus() {
    let per_file: usize = std::env::var("CUSTOS_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("CUSTOS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift64*: deterministic, no dependency.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut runs = 0usize;
    for (name, f) in custos::fuzzing::TARGETS {
        let mut files: Vec<_> = std::fs::read_dir(root.join(name))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for p in files {
            let original = std::fs::read(&p).unwrap();
            for i in 0..per_file {
                let mut data = original.clone();
                for _ in 0..1 + next() % 4 {
                    let len = data.len().max(1);
                    let at = (next() as usize) % len;
                    match next() % 6 {
                        0 if !data.is_empty() => data[at] ^= 1 << (next() % 8),
                        1 if !data.is_empty() => {
                            data[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{'][(next() % 6) as usize]
                        }
                        2 => data.truncate(at),
                        3 if !data.is_empty() => {
                            let end = (at + 1 + (next() as usize) % 64).min(data.len());
                            let chunk = data[at..end].to_vec();
                            data.splice(at..at, chunk);
                        }
                        4 if !data.is_empty() => {
                            let end = (at + 1 + (next() as usize) % 64).min(data.len());
                            data.drain(at..end);
                        }
                        _ => data.insert(at.min(data.len()), (next() & 0xff) as u8),
                    }
                }
                let r = std::panic::catch_unwind(|| f(&data));
                assert!(
                    r.is_ok(),
                    "{name}: mutation {i} of {} panics its parser (CUSTOS_FUZZ_SEED={seed}); input: {data:?}",
                    p.display()
                );
                runs += 1;
            }
        }
    }
    eprintln!("{runs} mutated inputs, seed {seed}");
}

//! Deterministic benchmark datasets for `scripts/bench.sh`.
//!
//! ```text
//! cargo run --release --example bench_dataset -- generate SIZE SEED DIR
//! cargo run --release --example bench_dataset -- mutate PERCENT SEED DIR
//! ```
//!
//! The mix (by bytes): 40% compressible logs and JSON, 40% incompressible
//! binaries, 20% small files (1–64 KiB, text and binary, in a nested tree).
//! The same SIZE and SEED always give the same bytes; `mutate` changes about
//! PERCENT % of the files (appends, in-place edits, rewrites), also by seed.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_dataset generate SIZE SEED DIR | mutate PERCENT SEED DIR";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["generate", size, seed, dir] => generate(
            parse_size(size).expect(usage),
            seed.parse().expect(usage),
            Path::new(dir),
        ),
        ["mutate", pct, seed, dir] => mutate(
            pct.parse().expect(usage),
            seed.parse().expect(usage),
            Path::new(dir),
        ),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (n, mult) = match s.chars().last()? {
        'G' | 'g' => (&s[..s.len() - 1], 1u64 << 30),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    Some((n.parse::<f64>().ok()? * mult as f64) as u64)
}

const WORDS: &[&str] = &[
    "request", "user", "order", "payment", "session", "cache", "timeout", "retry", "shard",
    "tenant", "invoice", "login", "upload", "download", "token", "queue", "worker", "backup",
    "restore", "metrics",
];
const LEVELS: &[&str] = &["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"];

fn log_line(rng: &mut StdRng, out: &mut impl Write, t: &mut u64) -> std::io::Result<()> {
    *t += rng.random_range(1..2_000);
    writeln!(
        out,
        "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z {} svc={} req={:016x} {}={} status={} latency_ms={} path=/v1/{}/{}",
        1 + (*t / 86_400_000) % 28,
        (*t / 3_600_000) % 24,
        (*t / 60_000) % 60,
        (*t / 1000) % 60,
        *t % 1000,
        LEVELS[rng.random_range(0..LEVELS.len())],
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random::<u64>(),
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_range(0..100_000u32),
        [200, 200, 200, 201, 204, 400, 404, 500][rng.random_range(0..8)],
        rng.random_range(0..900u32),
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_range(0..1_000_000u32),
    )
}

fn json_line(rng: &mut StdRng, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        r#"{{"id":{},"type":"{}","tenant":"t{}","amount":{}.{:02},"currency":"EUR","tags":["{}","{}"],"ok":{}}}"#,
        rng.random_range(0..10_000_000u32),
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_range(0..500u32),
        rng.random_range(0..10_000u32),
        rng.random_range(0..100u32),
        WORDS[rng.random_range(0..WORDS.len())],
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_bool(0.9),
    )
}

fn write_text(path: &Path, size: u64, rng: &mut StdRng, json: bool) -> std::io::Result<()> {
    let mut w = CountingWriter {
        inner: BufWriter::with_capacity(1 << 20, fs::File::create(path)?),
        n: 0,
    };
    let mut t = rng.random_range(0..1_000_000_000u64);
    while w.n < size {
        if json {
            json_line(rng, &mut w)?
        } else {
            log_line(rng, &mut w, &mut t)?
        }
    }
    w.inner.flush()
}

struct CountingWriter<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_random(path: &Path, size: u64, rng: &mut StdRng) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

fn generate(size: u64, seed: u64, dir: &Path) {
    let mut rng = StdRng::seed_from_u64(seed);
    fs::create_dir_all(dir).unwrap();
    let (text, binary) = (size * 4 / 10, size * 4 / 10);
    let small = size - text - binary;
    let mut written = 0u64;
    let mut i = 0;
    while written < text {
        let n = rng
            .random_range(1 << 20..20 << 20)
            .min(text - written)
            .max(1);
        let json = i % 3 == 2;
        let d = dir.join("logs").join(format!("{:02}", i % 8));
        fs::create_dir_all(&d).unwrap();
        write_text(
            &d.join(format!(
                "{}-{i:04}.{}",
                if json { "events" } else { "app" },
                if json { "jsonl" } else { "log" }
            )),
            n,
            &mut rng,
            json,
        )
        .unwrap();
        written += n;
        i += 1;
    }
    written = 0;
    i = 0;
    while written < binary {
        let n = rng
            .random_range(1 << 20..50 << 20)
            .min(binary - written)
            .max(1);
        let d = dir.join("media");
        fs::create_dir_all(&d).unwrap();
        write_random(&d.join(format!("blob-{i:04}.bin")), n, &mut rng).unwrap();
        written += n;
        i += 1;
    }
    written = 0;
    i = 0;
    while written < small {
        let n = rng
            .random_range(1 << 10..64 << 10)
            .min(small - written)
            .max(1);
        let d = dir
            .join("src")
            .join(format!("m{:02}", i % 40))
            .join(format!("p{:02}", (i / 40) % 25));
        fs::create_dir_all(&d).unwrap();
        let p = d.join(format!(
            "f{i:05}.{}",
            if i % 4 == 0 { "bin" } else { "txt" }
        ));
        if i % 4 == 0 {
            write_random(&p, n, &mut rng)
        } else {
            write_text(&p, n, &mut rng, i % 2 == 0)
        }
        .unwrap();
        written += n;
        i += 1;
    }
    println!("generated {} bytes in {}", size, dir.display());
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

fn mutate(percent: f64, seed: u64, dir: &Path) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6d75_7461_7465);
    let all = files(dir);
    let count = ((all.len() as f64 * percent / 100.0).ceil() as usize).max(1);
    let mut changed = 0;
    // Exactly `count` files, chosen by seed.
    let mut chosen: Vec<&PathBuf> = Vec::with_capacity(count);
    let mut pool: Vec<&PathBuf> = all.iter().collect();
    while chosen.len() < count && !pool.is_empty() {
        let i = rng.random_range(0..pool.len());
        chosen.push(pool.swap_remove(i));
    }
    chosen.sort();
    for p in chosen {
        let len = fs::metadata(p).unwrap().len();
        match rng.random_range(0..3) {
            0 => {
                // Append, like a growing log.
                let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
                let mut t = 0;
                for _ in 0..rng.random_range(10..2000) {
                    log_line(&mut rng, &mut f, &mut t).unwrap();
                }
            }
            1 if len > 128 << 10 => {
                // Edit 64 KiB in place.
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; 64 << 10];
                rng.fill_bytes(&mut buf);
                let at = rng.random_range(0..len - buf.len() as u64);
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .write_all_at(&buf, at)
                    .unwrap();
            }
            _ => {
                // Rewrite small files whole; large ones get a new header.
                if len <= 64 << 10 {
                    write_random(p, len, &mut rng).unwrap()
                } else {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; 4096];
                    rng.fill_bytes(&mut buf);
                    fs::OpenOptions::new()
                        .write(true)
                        .open(p)
                        .unwrap()
                        .write_all_at(&buf, 0)
                        .unwrap();
                }
            }
        }
        changed += 1;
    }
    println!(
        "mutated {changed} of {} files in {}",
        all.len(),
        dir.display()
    );
}

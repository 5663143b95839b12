//! Deterministic benchmark datasets for `scripts/bench.sh`.
//!
//! ```text
//! cargo run --release --example bench_dataset -- generate SIZE SEED DIR
//! cargo run --release --example bench_dataset -- mutate PERCENT SEED DIR
//! cargo run --release --example bench_dataset -- small COUNT SEED DIR [MIN MAX DIRS]
//! cargo run --release --example bench_dataset -- touch-one SEED DIR
//! ```
//!
//! The mix (by bytes): 40% compressible logs and JSON, 40% incompressible
//! binaries, 20% small files (1–64 KiB, text and binary, in a nested tree).
//! The same SIZE and SEED always give the same bytes; `mutate` changes about
//! PERCENT % of the files (appends, in-place edits, rewrites), also by seed.
//!
//! `small` writes COUNT files of MIN–MAX bytes (default 200–4096) spread over
//! DIRS directories (default 1000), three in four log or JSON text, one in four
//! random bytes, every mtime fixed (so tools and rounds see the same metadata
//! without a pass of `touch` over millions of files). `touch-one` appends one
//! log line to one file chosen by seed: the "one file changed" of an
//! incremental run.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

const USAGE: &str = "usage: bench_dataset generate SIZE SEED DIR | mutate PERCENT SEED DIR \
                     | small COUNT SEED DIR [MIN MAX DIRS] | touch-one SEED DIR";

/// Bad arguments end the run with the usage and exit status 2, never a panic.
fn bad(what: &str, value: &str) -> ! {
    eprintln!("bench_dataset: {what}: {value:?} is not valid\n{USAGE}");
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(what: &str, value: &str) -> T {
    value.parse().unwrap_or_else(|_| bad(what, value))
}

fn size(what: &str, value: &str) -> u64 {
    parse_size(value).unwrap_or_else(|| bad(what, value))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["generate", sz, seed, dir] => {
            generate(size("SIZE", sz), num("SEED", seed), Path::new(dir))
        }
        ["mutate", pct, seed, dir] => {
            mutate(num("PERCENT", pct), num("SEED", seed), Path::new(dir))
        }
        ["small", count, seed, dir, rest @ ..] if matches!(rest.len(), 0 | 3) => {
            let shape = SmallShape {
                count: num("COUNT", count),
                min: rest.first().map_or(200, |v| size("MIN", v)),
                max: rest.get(1).map_or(4096, |v| size("MAX", v)),
                dirs: rest.get(2).map_or(1000, |v| num("DIRS", v)),
            };
            if shape.min == 0 || shape.min > shape.max || shape.dirs == 0 {
                eprintln!("bench_dataset: small needs 0 < MIN <= MAX and DIRS > 0\n{USAGE}");
                std::process::exit(2);
            }
            small(&shape, num("SEED", seed), Path::new(dir))
        }
        ["touch-one", seed, dir] => touch_one(num("SEED", seed), Path::new(dir)),
        _ => {
            eprintln!("{USAGE}");
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

struct SmallShape {
    count: u64,
    min: u64,
    max: u64,
    dirs: u64,
}

/// 2026-01-01 00:00:00 UTC: the mtime of every generated small file and directory.
fn fixed_mtime() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600)
}

fn small(shape: &SmallShape, seed: u64, dir: &Path) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0073_6d61_6c6c);
    let width = (shape.dirs - 1).to_string().len();
    let mut bytes = 0u64;
    for d in 0..shape.dirs {
        fs::create_dir_all(dir.join(format!("d{d:0width$}"))).unwrap();
    }
    // Round-robin over the directories: every directory holds about COUNT / DIRS files.
    for i in 0..shape.count {
        let d = dir.join(format!("d{:0width$}", i % shape.dirs));
        let n = rng.random_range(shape.min..=shape.max);
        let p = d.join(format!(
            "f{i:08}.{}",
            match i % 4 {
                0 => "bin",
                1 | 3 => "log",
                _ => "json",
            }
        ));
        match i % 4 {
            0 => write_random(&p, n, &mut rng),
            k => write_text_exact(&p, n, &mut rng, k == 2),
        }
        .unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(fixed_mtime()))
            .unwrap();
        bytes += n;
    }
    // Directories last: writing files into them moved their mtimes.
    for d in 0..shape.dirs {
        fs::File::open(dir.join(format!("d{d:0width$}")))
            .and_then(|f| f.set_modified(fixed_mtime()))
            .unwrap();
    }
    fs::File::open(dir)
        .and_then(|f| f.set_modified(fixed_mtime()))
        .unwrap();
    println!(
        "generated {} files, {bytes} bytes, in {} directories of {}",
        shape.count,
        shape.dirs,
        dir.display()
    );
}

/// Text of exactly `size` bytes (`write_text` may overshoot by a line, which
/// would take small files past their MAX).
fn write_text_exact(path: &Path, size: u64, rng: &mut StdRng, json: bool) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(size as usize + 512);
    let mut t = rng.random_range(0..1_000_000_000u64);
    while (buf.len() as u64) < size {
        if json {
            json_line(rng, &mut buf)?
        } else {
            log_line(rng, &mut buf, &mut t)?
        }
    }
    buf.truncate(size as usize);
    fs::write(path, buf)
}

/// Appends a log line to one file chosen by seed, walking down sorted
/// directory listings (no full listing of millions of files).
fn touch_one(seed: u64, dir: &Path) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0074_6f75_6368);
    let mut at = dir.to_path_buf();
    while at.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(&at)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().is_none_or(|n| n != ".complete"))
            .collect();
        if entries.is_empty() {
            eprintln!("touch-one: {} has no file to change", at.display());
            std::process::exit(1);
        }
        entries.sort();
        at = entries.swap_remove(rng.random_range(0..entries.len()));
    }
    let mut f = fs::OpenOptions::new().append(true).open(&at).unwrap();
    let mut t = 0;
    log_line(&mut rng, &mut f, &mut t).unwrap();
    println!("changed {}", at.display());
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

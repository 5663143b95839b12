#!/usr/bin/env bash
# Benchmarks custos against restic and borg (and rustic when installed) on the
# same deterministic dataset, in the same run, alternating tools, several rounds.
# Writes BENCHMARKS.md (medians and custos/peer ratios) and keeps raw numbers in
# $BENCH_DIR/results.tsv.
#
#   scripts/bench.sh [SIZE] [ROUNDS] [SEED]        defaults: 1G 3 42
#   scripts/bench.sh --scenario NAME [ARGS...]
#
# Scenarios (each writes its own table into BENCHMARKS.md, below the kept
# marker; scripts/README.md says what each measures):
#   mixed    the default: the 1 GiB mixed dataset, all phases, as described below
#   small    [COUNT] [ROUNDS] [SEED]    many small files (300000 1 42)
#   many     [COUNTS] [ROUNDS] [SEED]   millions of files, peak RSS growth ("1000000,2000000" 1 42)
#   s3       [SIZE] [ROUNDS] [SEED]     custos and restic on s3s-fs, direct and
#                                       through a 20 ms latency proxy (1G 1 42)
#   tenants  [TENANTS] [SIZE] [SEED]    one `custos daemon --once` over many tenants (1000 1M 42)
#
# Environment:
#   BENCH_DIR       work directory (default ./bench-data; needs ~4 × SIZE free)
#   BENCH_TOOLS     tools to run (default: custos restic borg, plus rustic if found)
#   BENCH_BACKEND   local (default) or s3: custos and restic against the S3
#                   emulator started by scripts/emulators.sh (borg has no S3)
#   BENCH_OUT       the report to write (default BENCHMARKS.md; "-" for none)
#   BENCH_REPORT_ONLY=1  rewrite the report from the rows already in BENCH_DIR
#   CARGO_TARGET_DIR the cargo target directory holding release/custos (default ./target)
#   BENCH_NO_BUILD=1 use the binaries already built there
#
# Phases, each timed with /usr/bin/time (wall, user, sys, peak RSS):
#   first       first backup of the dataset into an empty repository
#   incremental backup after a seeded mutation of about 5% of the files
#   unchanged   backup with nothing changed
#   restore     full restore of the latest snapshot into an empty directory
#   check       verification reading all data (custos check --read-data,
#               restic check --read-data, borg check --verify-data)
# and the repository size after the three backups. `tar | zstd -3 -T2` of the
# dataset is timed once per round as the floor a compressing backup can approach.
# Peers install with: apt-get install restic borgbackup   (rustic: cargo install rustic-rs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SCENARIO=mixed
if [[ ${1:-} == --scenario ]]; then
    SCENARIO=${2:?--scenario needs a name: mixed, small, many, s3 or tenants}
    shift 2
fi
case $SCENARIO in
mixed | small | many | s3 | tenants) ;;
*)
    echo "bench: error: unknown scenario '$SCENARIO' (mixed, small, many, s3, tenants)" >&2
    exit 2
    ;;
esac
SIZE=${1:-1G}
ROUNDS=${2:-3}
SEED=${3:-42}
B=$(realpath -m "${BENCH_DIR:-bench-data}")
BACKEND=${BENCH_BACKEND:-local}
OUT=${BENCH_OUT:-BENCHMARKS.md}

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x /usr/bin/time ]] || die "/usr/bin/time is needed (apt-get install time)"
command -v zstd >/dev/null || die "zstd is needed (apt-get install zstd)"

if [[ -n ${BENCH_TOOLS:-} ]]; then
    read -r -a TOOLS <<<"$BENCH_TOOLS"
else
    TOOLS=(custos)
    command -v restic >/dev/null && TOOLS+=(restic) || log "restic not installed: skipped"
    if [[ $BACKEND == local ]]; then
        command -v borg >/dev/null && TOOLS+=(borg) || log "borg not installed: skipped"
    fi
    command -v rustic >/dev/null && TOOLS+=(rustic)
fi

REPORT_ONLY=${BENCH_REPORT_ONLY:-0}
TARGET=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
if [[ $REPORT_ONLY != 1 && ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "building custos (release) in $TARGET"
    CARGO_TARGET_DIR=$TARGET cargo build --release --locked --bin custos --example bench_dataset >&2
fi
mkdir -p "$B/bin"
# Copies: a shared target directory may be rebuilt from another checkout mid-run.
if [[ $REPORT_ONLY != 1 ]]; then
    cp "$TARGET/release/custos" "$TARGET/release/examples/bench_dataset" "$B/bin/"
fi
CUSTOS=$B/bin/custos
GEN=$B/bin/bench_dataset

mkdir -p "$B"
PRISTINE=$B/pristine-$SIZE-$SEED
if [[ $SCENARIO == mixed && $REPORT_ONLY != 1 && ! -f $PRISTINE/.complete ]]; then
    log "generating the $SIZE dataset (seed $SEED)"
    rm -rf "$PRISTINE"
    "$GEN" generate "$SIZE" "$SEED" "$PRISTINE" >&2
    # Fixed mtimes: every round and every tool sees identical metadata.
    find "$PRISTINE" -exec touch -h -d '2026-01-01 00:00:00' {} +
    touch "$PRISTINE/.complete"
fi
DATA=$B/data            # the path every tool backs up (incremental runs need a stable path)
RESTORE=$B/restore
export B DATA RESTORE CUSTOS BACKEND
RESULTS=$B/results.tsv
[[ $REPORT_ONLY == 1 || $SCENARIO != mixed ]] || printf 'round\ttool\tphase\twall_s\tuser_s\tsys_s\tmaxrss_kib\n' >"$RESULTS"
SIZES=$B/sizes.tsv
[[ $REPORT_ONLY == 1 || $SCENARIO != mixed ]] || printf 'round\ttool\trepo_bytes\n' >"$SIZES"

if [[ $BACKEND == s3 && $SCENARIO == mixed ]]; then
    [[ -n ${AWS_ENDPOINT_URL:-} ]] || eval "$(scripts/emulators.sh start)"
    : "${AWS_ENDPOINT_URL:?}" "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
    export AWS_ALLOW_HTTP=true AWS_EC2_METADATA_DISABLED=true
fi
mkbucket() {
    curl -sf --aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X PUT "$AWS_ENDPOINT_URL/$1" >/dev/null || true
}

# proxy_requests: "requests bytes_up bytes_down" counted so far by the latency proxy.
proxy_requests() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["requests"], d["bytes_up"], d["bytes_down"])' "$PROXY_STATS"
}

# measure ROUND TOOL PHASE CMD...: runs CMD under /usr/bin/time, appends a result row.
# CMD may be one of the shell functions below: it runs in a child bash that
# gets every function (the variables they read are exported).
# Scenarios set CASE (a first column naming the case, e.g. the file count) and,
# behind the latency proxy, PROXY_STATS and REQUESTS (requests per phase).
measure() {
    local round=$1 tool=$2 phase=$3
    shift 3
    sync
    local r0=""
    [[ -z ${PROXY_STATS:-} ]] || r0=$(proxy_requests)
    if declare -F "$1" >/dev/null; then
        set -- bash -c "$(declare -f); $*"
    fi
    if ! /usr/bin/time -f '%e %U %S %M' -o "$B/time.out" "$@" >"$B/cmd.out" 2>"$B/cmd.err"; then
        cat "$B/cmd.out" "$B/cmd.err" >&2
        die "$tool $phase failed (round $round)"
    fi
    local wall user sys rss
    read -r wall user sys rss <"$B/time.out"
    local pre=""
    [[ -z ${CASE:-} ]] || pre=$CASE$'\t'
    printf '%s%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pre" "$round" "$tool" "$phase" "$wall" "$user" "$sys" "$rss" >>"$RESULTS"
    log "${CASE:+$CASE }round $round $tool $phase: ${wall}s wall, ${user}s user, ${sys}s sys, $((rss / 1024)) MiB peak"
    if [[ -n ${PROXY_STATS:-} ]]; then
        local n0 u0 d0 n1 u1 d1
        read -r n0 u0 d0 <<<"$r0"
        read -r n1 u1 d1 <<<"$(proxy_requests)"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$CASE" "$round" "$tool" "$phase" $((n1 - n0)) $((u1 - u0)) $((d1 - d0)) >>"$REQUESTS"
        log "  $((n1 - n0)) requests, $(((u1 - u0) >> 20)) MiB up, $(((d1 - d0) >> 20)) MiB down"
    fi
}

# --- one tool, one round --------------------------------------------------------

# shellcheck source=scripts/bench/custos-config.sh
source "$ROOT/scripts/bench/custos-config.sh"
custos_setup() {
    local c=$B/custos
    rm -rf "$c" && mkdir -p "$c/policies"
    local store="file://$c/store"
    if [[ $BACKEND == s3 ]]; then
        # One bucket for both tools (as a user would), a prefix per tool and run.
        mkbucket "${BENCH_BUCKET:-bench}"
        store="s3://${BENCH_BUCKET:-bench}/custos-run-$RANDOM$RANDOM"
    fi
    custos_write_config "$c" "$store" "$DATA"
    export CUSTOS_LOG=warn
}
custos_init() { "$CUSTOS" --config "$B/custos/custos.toml" tenant init bench; }
custos_backup() { "$CUSTOS" --config "$B/custos/custos.toml" backup bench; }
custos_restore() { "$CUSTOS" --config "$B/custos/custos.toml" restore bench latest --target "$RESTORE"; }
custos_check() { "$CUSTOS" --config "$B/custos/custos.toml" check bench --read-data; }
custos_size() {
    if [[ $BACKEND == s3 ]]; then echo 0; else du -sb "$B/custos/store" | cut -f1; fi
}

restic_setup() {
    export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$B/restic-cache
    rm -rf "$B/restic" "$RESTIC_CACHE_DIR"
    if [[ $BACKEND == s3 ]]; then
        mkbucket "${BENCH_BUCKET:-bench}"
        export RESTIC_REPOSITORY="s3:$AWS_ENDPOINT_URL/${BENCH_BUCKET:-bench}/restic-run-$RANDOM$RANDOM"
    else
        export RESTIC_REPOSITORY=$B/restic
    fi
}
restic_init() { restic init; }
restic_backup() { restic backup --quiet "$DATA"; }
restic_restore() { restic restore latest --target "$RESTORE"; }
restic_check() { restic check --read-data; }
restic_size() { if [[ $BACKEND == s3 ]]; then echo 0; else du -sb "$B/restic" | cut -f1; fi; }

rustic_setup() {
    export RUSTIC_PASSWORD=bench RUSTIC_REPOSITORY=$B/rustic RUSTIC_CACHE_DIR=$B/rustic-cache
    rm -rf "$B/rustic" "$RUSTIC_CACHE_DIR"
}
rustic_init() { rustic init; }
rustic_backup() { rustic backup "$DATA"; }
rustic_restore() { rustic restore latest "$RESTORE"; }
rustic_check() { rustic check --read-data; }
rustic_size() { du -sb "$B/rustic" | cut -f1; }

borg_setup() {
    export BORG_REPO=$B/borg BORG_PASSPHRASE=bench BORG_BASE_DIR=$B/borg-base
    export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
    rm -rf "$BORG_REPO" "$BORG_BASE_DIR"
}
borg_init() { borg init --encryption repokey-blake2; }
# zstd level 3, like custos and restic; borg's default is lz4. BORG_N (the
# archive number) is counted up by run_tool before each backup.
borg_backup() { borg create --compression zstd,3 "::a$BORG_N" "$DATA"; }
borg_restore() { (cd "$RESTORE" && borg extract "::a$BORG_N"); }
borg_check() { borg check --verify-data; }
borg_size() { du -sb "$B/borg" | cut -f1; }

run_tool() {
    local round=$1 tool=$2
    rm -rf "$DATA" "$RESTORE"
    cp -a "$PRISTINE" "$DATA"
    rm -f "$DATA/.complete"
    "${tool}_setup"
    "${tool}_init" >/dev/null 2>&1 || die "$tool init failed"
    export BORG_N=1
    measure "$round" "$tool" first "${tool}_backup"
    "$GEN" mutate 5 "$SEED" "$DATA" >&2
    BORG_N=2
    measure "$round" "$tool" incremental "${tool}_backup"
    BORG_N=3
    measure "$round" "$tool" unchanged "${tool}_backup"
    mkdir -p "$RESTORE"
    measure "$round" "$tool" restore "${tool}_restore"
    # The restore must be complete and identical (not timed).
    local restored
    restored=$(find "$RESTORE" -type d -name data -path "*$(basename "$DATA")" | head -1)
    [[ $tool == custos ]] && restored=$RESTORE/data
    diff -r --no-dereference "$DATA" "$restored" >/dev/null || die "$tool restored something different (round $round)"
    # SKIP_PHASES ("tool:phase ..."): a check a server cannot serve (see the s3 scenario).
    if [[ " ${SKIP_PHASES:-} " != *" $tool:check "* ]]; then
        measure "$round" "$tool" check "${tool}_check"
    fi
    printf '%s\t%s\t%s\n' "$round" "$tool" "$("${tool}_size")" >>"$SIZES"
    rm -rf "$RESTORE"
}

tar_floor() {
    measure "$1" "tar|zstd" first bash -c "tar -C '$PRISTINE' -cf - . | zstd -3 -T2 -q -c > /dev/null"
}

if [[ $SCENARIO != mixed ]]; then
    # shellcheck source=scripts/bench/scenarios.sh
    source "$ROOT/scripts/bench/scenarios.sh"
    exit 0
fi

for ((round = 1; round <= ROUNDS && REPORT_ONLY != 1; round++)); do
    # Alternate the order so no tool always runs on a warmer (or hotter) machine.
    n=${#TOOLS[@]}
    for ((k = 0; k < n; k++)); do
        run_tool "$round" "${TOOLS[(k + round - 1) % n]}"
    done
    tar_floor "$round"
done
[[ $REPORT_ONLY == 1 ]] || rm -rf "$DATA"

[[ $OUT == - ]] && exit 0
python3 - "$RESULTS" "$SIZES" "$OUT" "$SIZE" "$ROUNDS" "$SEED" "$BACKEND" <<'PY'
import csv, statistics, subprocess, sys, platform, datetime
results, sizes, out, size, rounds, seed, backend = sys.argv[1:]
rows = list(csv.DictReader(open(results), delimiter="\t"))
sz = list(csv.DictReader(open(sizes), delimiter="\t"))
tools = []
for r in rows:
    if r["tool"] not in tools:
        tools.append(r["tool"])
phases = ["first", "incremental", "unchanged", "restore", "check"]
def med(tool, phase, field):
    v = [float(r[field]) for r in rows if r["tool"] == tool and r["phase"] == phase]
    return statistics.median(v) if v else None
def medsize(tool):
    v = [int(r["repo_bytes"]) for r in sz if r["tool"] == tool]
    return statistics.median(v) if v else None
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
mem = subprocess.run(["sh", "-c", "free -g | awk '/Mem:/{print $2}'"], capture_output=True, text=True).stdout.strip()
versions = {}
for t, cmd in [("restic", "restic version"), ("borg", "borg --version"), ("rustic", "rustic --version"), ("zstd", "zstd --version")]:
    try:
        versions[t] = subprocess.run(cmd.split(), capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        pass
L = []
L.append("# Benchmarks\n")
L.append(f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC by `scripts/bench.sh {size} {rounds} {seed}` "
         f"(backend: {backend}). Medians of {rounds} rounds; tools alternate order each round.\n")
L.append(f"Machine: {platform.machine()}, {cpu}, {mem} GiB RAM, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
         + ", ".join(f"{k}: {v}" for k, v in versions.items()) + ".\n")
L.append("Dataset: 40% compressible logs/JSON, 40% incompressible binaries, 20% small files (1–64 KiB); "
         "the incremental run follows a seeded mutation of about 5% of the files. "
         "Settings: custos defaults (zstd 3); restic defaults (repository v2, compression auto); borg `--compression zstd,3`, `repokey-blake2`.\n")
L.append("## Wall time (seconds) and peak memory\n")
esc = lambda t: t.replace("|", "\\|")  # a pipe inside a table cell
L.append("| phase | " + " | ".join(esc(t) for t in tools) + " |")
L.append("|---|" + "---|" * len(tools))
for p in phases + ["rss"]:
    cells = []
    for t in tools:
        if p == "rss":
            v = max((med(t, ph, "maxrss_kib") or 0) for ph in phases) / 1024
            cells.append(f"{v:.0f} MiB" if v else "")
        else:
            v = med(t, p, "wall_s")
            cells.append(f"{v:.2f}" if v is not None else "")
    L.append(f"| {'peak RSS (any phase)' if p == 'rss' else p} | " + " | ".join(cells) + " |")
cells = []
for t in tools:
    s = medsize(t)
    cells.append(f"{s / 2**20:.0f} MiB" if s else "")
L.append("| repository size | " + " | ".join(cells) + " |")
L.append("")
peers = [t for t in tools if t not in ("custos", "tar|zstd")]
if "custos" in tools and peers:
    L.append("## custos / peer ratios (below 1: custos is faster or smaller)\n")
    L.append("| phase | " + " | ".join(peers) + " |")
    L.append("|---|" + "---|" * len(peers))
    for p in phases:
        c = med("custos", p, "wall_s")
        L.append(f"| {p} | " + " | ".join(f"{c / med(t, p, 'wall_s'):.2f}" if c and med(t, p, 'wall_s') else "" for t in peers) + " |")
    c = medsize("custos")
    L.append("| repository size | " + " | ".join(f"{c / medsize(t):.3f}" if c and medsize(t) else "" for t in peers) + " |")
    L.append("")
    # CPU use per round (a median of ratios, not a ratio of medians).
    firsts = [r for r in rows if r["tool"] == "custos" and r["phase"] == "first"]
    per_round = [(float(r["user_s"]) + float(r["sys_s"])) / float(r["wall_s"]) for r in firsts]
    cpu = statistics.median(per_round) if per_round else None
    L.append("custos first backup CPU use, (user + sys) / wall per round: "
             + ", ".join(f"{v:.2f}" for v in per_round) + f"; median {cpu:.2f}.\n")
    # The targets of the performance issue, each with its measured value.
    def ratio(phase, peer):
        c, p = med("custos", phase, "wall_s"), med(peer, phase, "wall_s")
        return c / p if c and p else None
    def row(what, target, value, ok, fmt="{:.2f}"):
        shown = fmt.format(value) if value is not None else "not measured"
        verdict = "—" if value is None else ("met" if ok(value) else "**missed**")
        L.append(f"| {what} | {target} | {shown} | {verdict} |")
    L.append("## Targets\n")
    L.append("| what | target | measured | |")
    L.append("|---|---|---|---|")
    for peer in ("restic", "borg"):
        if peer in tools:
            row(f"first backup / {peer}", "≤ 0.5", ratio("first", peer), lambda v: v <= 0.5)
    if "tar|zstd" in tools:
        row("first backup / `tar \\| zstd -3 -T2`", "≤ 1.5", ratio("first", "tar|zstd"), lambda v: v <= 1.5)
    if "restic" in tools:
        row("backup after 5% change / restic", "≤ 0.7", ratio("incremental", "restic"), lambda v: v <= 0.7)
        row("backup with nothing changed / restic", "≤ 0.7", ratio("unchanged", "restic"), lambda v: v <= 0.7)
        row("full restore / restic", "≤ 0.5", ratio("restore", "restic"), lambda v: v <= 0.5)
        row("check --read-data / restic", "≤ 0.7", ratio("check", "restic"), lambda v: v <= 0.7)
        c, r = medsize("custos"), medsize("restic")
        row("repository size / restic", "≤ 1.02", c / r if c and r else None, lambda v: v <= 1.02, "{:.3f}")
    for phase in ("first", "restore"):
        v = med("custos", phase, "maxrss_kib")
        row(f"peak RSS, {phase}", "≤ 150 MiB", v / 1024 if v else None, lambda v: v <= 150, "{:.0f} MiB")
    row("CPU (user + sys) / wall, first backup (median of rounds)", "≥ 1.6", cpu, lambda v: v >= 1.6)
    L.append("")
L.append("Raw rows: `results.tsv` and `sizes.tsv` in the bench directory.\n")
# Notes and other runs written below the marker survive a regeneration.
MARK = "<!-- kept by scripts/bench.sh: notes and other runs below -->"
try:
    old = open(out).read()
    if MARK in old:
        L.append(MARK + old.split(MARK, 1)[1].rstrip("\n") + "\n")
except FileNotFoundError:
    pass
open(out, "w").write("\n".join(L))
print(f"wrote {out}")
PY

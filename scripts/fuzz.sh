#!/usr/bin/env bash
# Fuzzes every parser of stored or user-supplied data (fuzz/fuzz_targets/,
# entry points in src/fuzzing.rs), one target at a time, at nice 19.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   default 60 s per target, every target
#   scripts/fuzz.sh --minimise              shrink fuzz/corpus/<target>/ in place
#   FUZZ_JOBS=2 scripts/fuzz.sh 600         two targets at a time (both at nice 19)
#   FUZZ_BIN=DIR scripts/fuzz.sh ...        run prebuilt target binaries from DIR
#
# cargo-fuzz needs nightly flags; on the stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them (cargo install cargo-fuzz --locked first). Targets are built
# once, without a sanitizer (-s none: custos is safe Rust, and this runs
# several times faster) and with debug assertions (overflow checks on), then
# run directly (`cargo fuzz run` would rebuild before every target).
#
# New inputs found go to fuzz/target/corpus/<target>/ (not committed); a crash
# is saved in fuzz/artifacts/<target>/ and ends the run with a non-zero exit:
# copy it to fuzz/regressions/<target>/ (tests/it/fuzz_corpus.rs replays those on
# stable in every `cargo test`) and fix the parser.
# Prints one line per target: date, seconds, executions, result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo install cargo-fuzz --locked" >&2; exit 2; }

all=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^custos-fuzz$')
bin=${FUZZ_BIN:-}
if [[ -z $bin ]]; then
    nice -n 19 cargo fuzz build -s none --fuzz-dir . >&2
    bin=target/$(rustc -vV | sed -n 's/^host: //p')/release
fi
if [[ ${1:-} == --minimise ]]; then
    for t in $all; do
        mkdir -p target/cmin/$t
        nice -n 19 "$bin/$t" -merge=1 target/cmin/$t corpus/$t target/corpus/$t >/dev/null 2>&1 || true
        rm -rf corpus/$t && mv target/cmin/$t corpus/$t
        echo "$t: $(ls corpus/$t | wc -l) inputs" >&2
    done
    exit 0
fi
seconds=${1:-60}
shift || true
targets=${*:-$all}

one() {
    local t=$1
    mkdir -p target/corpus/$t artifacts/$t
    local log=target/fuzz-$t.log result
    # Work corpus first (new finds land there), seeds from the committed corpus.
    if nice -n 19 "$bin/$t" target/corpus/$t corpus/$t \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=1048576 -timeout=10 \
        -artifact_prefix=artifacts/$t/ -print_final_stats=1 > "$log" 2>&1; then
        result=ok
    else
        result="CRASH (see fuzz/$log, fuzz/artifacts/$t/)"
    fi
    local execs
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    echo "$(date -u +%FT%TZ) $t ${seconds}s ${execs:-?} executions $result"
    [[ $result == ok ]]
}

status=0
jobs=${FUZZ_JOBS:-1}
running=0
for t in $targets; do
    one "$t" &
    running=$((running + 1))
    if (( running >= jobs )); then
        wait -n || status=1
        running=$((running - 1))
    fi
done
while (( running > 0 )); do
    wait -n || status=1
    running=$((running - 1))
done
exit $status

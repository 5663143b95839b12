#!/usr/bin/env bash
# Fuzzes every parser of stored or user-supplied data (fuzz/fuzz_targets/,
# entry points in src/fuzzing.rs), one target at a time, at nice 19.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   default 60 s per target, every target
#   scripts/fuzz.sh --minimise              shrink fuzz/corpus/<target>/ in place
#
# cargo-fuzz needs nightly flags; on the stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them (cargo install cargo-fuzz first). Targets are built without a
# sanitizer (-s none: custos is safe Rust, and this runs several times faster)
# and with debug assertions (overflow checks on).
#
# New inputs found go to fuzz/target/corpus/<target>/ (not committed); a crash
# is saved in fuzz/artifacts/<target>/ and ends the run with a non-zero exit:
# copy it to fuzz/regressions/<target>/ (tests/fuzz_corpus.rs replays those on
# stable in every `cargo test`) and fix the parser.
# Prints one line per target: date, seconds, executions, result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo install cargo-fuzz --locked" >&2; exit 2; }

all=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^custos-fuzz$')
if [[ ${1:-} == --minimise ]]; then
    nice -n 19 cargo fuzz build -s none --fuzz-dir . >&2
    for t in $all; do
        mkdir -p target/cmin/$t
        nice -n 19 cargo fuzz cmin -s none --fuzz-dir . "$t" corpus/$t >&2
    done
    exit 0
fi
seconds=${1:-60}
shift || true
targets=${*:-$all}
nice -n 19 cargo fuzz build -s none --fuzz-dir . >&2
status=0
for t in $targets; do
    mkdir -p target/corpus/$t artifacts/$t
    log=target/fuzz-$t.log
    # Work corpus first (new finds land there), seeds from the committed corpus.
    if nice -n 19 cargo fuzz run -s none --fuzz-dir . "$t" target/corpus/$t corpus/$t -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=1048576 \
        -artifact_prefix=artifacts/$t/ -print_final_stats=1 > "$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log, fuzz/artifacts/$t/)"
        status=1
    fi
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    [[ -n $execs ]] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    echo "$(date -u +%FT%TZ) $t ${seconds}s ${execs:-?} executions $result"
done
exit $status

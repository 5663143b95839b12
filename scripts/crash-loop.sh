#!/usr/bin/env bash
# Large crash-loop campaign: kills backup, forget, prune, rotate and shred with SIGKILL at
# seeded random points, COUNT times each, and `rotate --cmk` of a fresh tenant
# (local key) at each named point of the key file write and COUNT random
# points, each followed by a shred that must leave no key material; checks
# every invariant after every kill (tests/it/crash_loop.rs). Runs on the local store, and on S3 when
# the emulator environment is set (eval "$(scripts/emulators.sh start)").
#
#   scripts/crash-loop.sh [COUNT] [SEED]     default COUNT 200, SEED random
#
# The crash points need a `--features test-hooks` build (src/hooks.rs).
# Runs at nice 19 (shared machines). Prints the figures for docs/reliability.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
count=${1:-200}
seed=${2:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
tests=(crash_loop_local_store)
if [[ ${CUSTOS_TEST_EMULATORS:-0} == 1 ]]; then
    tests+=(crash_loop_s3)
else
    echo "crash-loop.sh: no emulator environment; local store only" >&2
fi
cargo test --features test-hooks --test it --no-run >&2
mkdir -p target/crash-loop
status=0
for t in "${tests[@]}"; do
    echo "== $t: $count kills per job, seed $seed ($(date -u +%FT%TZ))" >&2
    log=target/crash-loop/$t.log
    start=$(date +%s)
    if ! CUSTOS_CRASH_LOOPS=$count CUSTOS_CRASH_SEED=$seed \
        nice -n 19 cargo test --features test-hooks --test it "crash_loop::$t" -- --exact --nocapture > "$log" 2>&1; then
        status=1
    fi
    grep -E '^crash loop|panicked|reproduce|test result' "$log" || true
    echo "   $(( $(date +%s) - start )) s; full log: $log" >&2
done
exit $status

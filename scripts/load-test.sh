#!/usr/bin/env bash
# Load test: N tenants (default 200) backed up concurrently by one daemon
# (`custos daemon --once`: runs every due job, bounded by max_concurrent_jobs,
# exits non-zero if any failed) against the S3 emulator, then every tenant's
# snapshot checked. Reports wall time, the daemon's peak memory (max RSS),
# and what was lost (must be nothing).
#
#   eval "$(scripts/emulators.sh start)"
#   scripts/load-test.sh [TENANTS] [CONCURRENCY]      default 200 tenants, 8 jobs at once
#   CUSTOS_BIN=target/debug/custos scripts/load-test.sh   skip the release build
#
# Traffic goes only to the emulator on 127.0.0.1. Needs `custos daemon`
# (branch daemon); until it is on main this script says so and stops.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tenants=${1:-200}
concurrency=${2:-8}
: "${AWS_ENDPOINT_URL:?start the emulators first: eval \"\$(scripts/emulators.sh start)\"}"
bucket=${CUSTOS_TEST_S3_BUCKET:-custos-test}

# CUSTOS_BIN: a custos binary to use (default: a release build made now).
bin=${CUSTOS_BIN:-}
if [[ -z $bin ]]; then
    cargo build --release --bin custos >&2
    bin=target/release/custos
fi
if ! "$bin" daemon --help >/dev/null 2>&1; then
    echo "load-test.sh: this custos has no daemon command yet (branch daemon); nothing measured" >&2
    exit 2
fi

work=$(mktemp -d /tmp/custos-load.XXXXXX)
trap 'rm -rf "$work"' EXIT
prefix=load-$(date +%s)
mkdir -p "$work/policies" "$work/data"
cat > "$work/custos.toml" <<TOML
store = "s3://$bucket/$prefix"
state_dir = "$work/state"
policies_dir = "$work/policies"
[local_keys]
dir = "$work/keys"
[daemon]
max_concurrent_jobs = $concurrency
jitter = "0s"
TOML
chmod 600 "$work/custos.toml"
# Each tenant: a few MiB of its own data (random, so nothing dedups across
# files), and a schedule that is due at once.
for i in $(seq -w 1 "$tenants"); do
    t=t$i
    mkdir -p "$work/data/$t"
    head -c $((1 << 20)) /dev/urandom > "$work/data/$t/a.bin"
    head -c $((512 << 10)) /dev/urandom > "$work/data/$t/b.bin"
    for j in 1 2 3 4 5; do echo "$t file $j" > "$work/data/$t/small-$j.txt"; done
    cat > "$work/policies/$t.toml" <<TOML
tenant = "$t"
key = "local:$t"
[[sources]]
type = "path"
path = "$work/data/$t"
name = "data"
[backup]
schedule = "* * * * *"
TOML
done

echo "== $tenants tenants, $concurrency jobs at once, store s3://$bucket/$prefix" >&2
start=$(date +%s.%N)
set +e
/usr/bin/time -v "$bin" --config "$work/custos.toml" daemon --once \
    > "$work/daemon.log" 2> "$work/daemon.err"
daemon_status=$?
set -e
end=$(date +%s.%N)
rss=$(grep -E 'Maximum resident set size' "$work/daemon.err" | grep -oE '[0-9]+$')
head -n1 "$work/daemon.log" >&2
grep -vE ' success ' "$work/daemon.log" | sed -n '2,20p' >&2 || true

ok=0 lost=0
for i in $(seq -w 1 "$tenants"); do
    t=t$i
    if "$bin" --config "$work/custos.toml" check "$t" --read-data >/dev/null 2>&1 &&
        [[ $("$bin" --config "$work/custos.toml" snapshots "$t" --json | grep -c '"id"') -ge 1 ]]; then
        ok=$((ok + 1))
    else
        lost=$((lost + 1))
        echo "tenant $t: no checked snapshot" >&2
    fi
done
printf 'load test %s: %d tenants, %d at once: daemon exit %d in %.1f s, max RSS %d MiB; %d tenants with a checked snapshot, %d lost\n' \
    "$(date -u +%FT%TZ)" "$tenants" "$concurrency" "$daemon_status" "$(echo "$end - $start" | bc)" \
    $((rss / 1024)) "$ok" "$lost"
[[ $daemon_status == 0 && $lost == 0 ]]

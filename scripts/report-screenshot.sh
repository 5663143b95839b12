#!/usr/bin/env bash
# Renders the compliance report of a fixture history to a PNG (the picture in
# the README and docs/report.md):
#
#   scripts/report-screenshot.sh [OUT.png]      (default: docs/report.png)
#
# 1. Builds custos with --features test-hooks: the fixture runs on a fake
#    clock (CUSTOS_NOW), so forty days of history take seconds.
# 2. Builds the history of tests/it/compliance_report.rs in a temporary
#    directory: tenant acme (CMK never rotated, a 3-day backup gap, a drill
#    whose verify command fails, one that misses its RTO, a new epoch, a
#    read-data check, epoch 1 shredded) and tenant globex (all on time).
# 3. Writes the HTML report as of 2026-03-31 12:00 UTC and renders it with
#    headless Chromium (apt-get install -y chromium) at 1200x1800.
#
# Not run by scripts/test.sh: the Rust test asserts the report; this only
# takes its picture.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-docs/report.png}
case $out in /*) ;; *) out=$PWD/$out ;; esac

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "report-screenshot: needs Chromium: apt-get install -y chromium" >&2
    exit 1
fi

cargo build --features test-hooks --bin custos >&2
bin=$PWD/target/debug/custos

d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/policies"
cat > "$d/custos.toml" <<EOF
store = "file://$d/store"
state_dir = "$d/state"
policies_dir = "$d/policies"
[local_keys]
dir = "$d/keys"
[controls]
cmk_max_age = "30d"
EOF

policy() { # TENANT RTO VERIFY-COMMAND
    mkdir -p "$d/src-$1"
    echo "$1" > "$d/src-$1/data.txt"
    cat > "$d/policies/$1.toml" <<EOF
tenant = "$1"
key = "local:$1"
[[sources]]
type = "path"
path = "$d/src-$1"
name = "data"
[retention]
keep_last = 30
[drill]
rto = "$2"
verify_command = $3
EOF
}

now=2026-03-31T12:00:00Z
run() { # DAYS-AGO ARGS...: custos as of that day
    local when
    when=$(date -u -d "$now - $1 days" +%Y-%m-%dT%H:%M:%SZ)
    shift
    CUSTOS_NOW=$when CUSTOS_LOG=off "$bin" --config "$d/custos.toml" "$@" >/dev/null
}

ok='["test", "-s", "{file:data/data.txt}"]'
policy acme 10m "$ok"
policy globex 10m "$ok"
run 40 backup acme
run 20 rotate acme --new-epoch
for day in 16 15 14 13 12 11 8 7 6 5 4 3 2 1; do
    run "$day" backup acme
    case $day in
    13) run 13 drill acme ;;
    6)
        policy acme 10m '["false"]'
        run 6 drill acme || true # fails: the verify command
        policy acme 10m "$ok"
        ;;
    3)
        run 3 check acme --read-data
        run 3 backup globex
        ;;
    2)
        policy acme 1ms "$ok"
        run 2 drill acme || true # fails: the RTO
        policy acme 10m "$ok"
        run 2 backup globex
        ;;
    1)
        run 1 forget acme --keep-last 5 --prune
        run 1 shred acme --confirm acme --epoch 1 --reason "epoch 1 expired"
        run 1 backup globex
        run 1 drill globex
        run 1 check globex --read-data
        ;;
    esac
done

CUSTOS_NOW=$now "$bin" --config "$d/custos.toml" report --format html --output "$d/report.html"
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --screenshot="$out" --window-size=1200,1800 "file://$d/report.html" 2>/dev/null
echo "report-screenshot: wrote $out" >&2

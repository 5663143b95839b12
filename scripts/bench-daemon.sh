#!/usr/bin/env bash
# Benchmarks `custos daemon` with many tenants (default 1000):
#
#   1. start-up: policies loaded and every job planned (daemon.started load_ms,
#      and the wall time from exec to that event);
#   2. idle: CPU time and memory over 60 s while no job is due (schedules whose
#      first slot is years away);
#   3. jitter: every tenant due at once (a first start: jobs that never ran are
#      due), spread by daemon.jitter; the job.started times, per 10 s and per
#      second, show the spread (and the job limit's effect).
#
# Usage: scripts/bench-daemon.sh [TENANTS] [JITTER_SECONDS]
# Needs python3 (to read the JSON logs). Uses target/release/custos (built if
# missing; CUSTOS_BIN overrides). Data under bench-data/ (git-ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-1000}
JITTER=${2:-60}
IDLE_SECONDS=${IDLE_SECONDS:-60}
BIN=${CUSTOS_BIN:-target/release/custos}
[[ -x $BIN ]] || cargo build --release
mkdir -p bench-data
WORK=$(mktemp -d "$PWD/bench-data/daemon.XXXXXX")
trap 'kill $PID 2>/dev/null || true; wait 2>/dev/null || true' EXIT
echo "bench-daemon: $N tenants, jitter ${JITTER}s, work dir $WORK" >&2

# One policies directory per phase: sources and keys come from defaults.toml.
mkdir -p "$WORK/src"
echo "a small file" > "$WORK/src/file.txt"
make_policies() { # dir backup-schedule [extra defaults.toml lines]
    mkdir -p "$1"
    cat > "$1/defaults.toml" <<EOF
key = "local:{tenant}"
[[sources]]
type = "path"
path = "$WORK/src"
name = "data"
[backup]
schedule = "$2"
${3:-}
EOF
    for i in $(seq -w 1 "$N"); do
        printf 'tenant = "t%s"\n' "$i" > "$1/t$i.toml"
    done
}
make_config() { # file policies-dir state-dir jitter max-jobs
    cat > "$1" <<EOF
store = "$WORK/store"
state_dir = "$3"
policies_dir = "$2"
[local_keys]
dir = "$WORK/keys"
[daemon]
jitter = "${4}s"
max_concurrent_jobs = $5
EOF
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_event() { # log event
    for _ in $(seq 1 600); do
        grep -q "\"event\":\"$2\"" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench-daemon: no $2 event in $1" >&2
    exit 1
}

# Phase 1 and 2: load and idle (first slots in 2099: nothing due).
make_policies "$WORK/idle-policies" "0 0 2 * * * 2099" \
    $'[retention]\nschedule = "0 30 3 * * * 2099"\n[check]\nschedule = "0 0 4 * * * 2099"' 
make_config "$WORK/idle.toml" "$WORK/idle-policies" "$WORK/idle-state" 300 2
t0=$(date +%s.%N)
CUSTOS_LOG_FORMAT=json "$BIN" --config "$WORK/idle.toml" daemon 2> "$WORK/idle.log" &
PID=$!
wait_event "$WORK/idle.log" daemon.started
t1=$(date +%s.%N)
load_ms=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e=json.loads(l)
    if e.get("event")=="daemon.started": print(e["load_ms"], e["tenants"], e["jobs"])' "$WORK/idle.log")
sleep 2
c0=$(ticks $PID); s0=$(date +%s.%N)
sleep "$IDLE_SECONDS"
c1=$(ticks $PID); s1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
rss=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
kill -TERM $PID; wait $PID || true
read -r lms tenants jobs <<< "$load_ms"
python3 - "$t0" "$t1" "$c0" "$c1" "$s0" "$s1" "$hz" "$rss" "$lms" "$tenants" "$jobs" <<'EOF'
import sys
t0, t1, c0, c1, s0, s1, hz, rss, lms, tenants, jobs = sys.argv[1:]
cpu = (float(c1) - float(c0)) / float(hz)
span = float(s1) - float(s0)
print(f"start-up: {tenants} tenants, {jobs} jobs planned: load_ms {lms} (exec to daemon.started {1000*(float(t1)-float(t0)):.0f} ms)")
print(f"idle: {cpu:.2f} s CPU in {span:.0f} s = {100*cpu/span:.2f} % of one core; RSS {int(rss)//1024} MiB")
EOF

# Phase 3: every tenant due at once, spread by jitter.
make_policies "$WORK/due-policies" "0 2 * * *"
make_config "$WORK/due.toml" "$WORK/due-policies" "$WORK/due-state" "$JITTER" 4
CUSTOS_LOG_FORMAT=json "$BIN" --config "$WORK/due.toml" daemon 2> "$WORK/due.log" &
PID=$!
wait_event "$WORK/due.log" daemon.started
# Wait for every backup to finish (or JITTER + 120 s).
deadline=$(( $(date +%s) + JITTER + 120 ))
while (( $(date +%s) < deadline )); do
    done_n=$(grep -c '"event":"job.finished"' "$WORK/due.log" || true)
    (( done_n >= N )) && break
    sleep 1
done
kill -TERM $PID; wait $PID || true
python3 - "$WORK/due.log" "$JITTER" <<'EOF'
import json, sys, collections
from datetime import datetime
def ts(s): return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
start, starts, fails, durations = None, [], 0, []
for line in open(sys.argv[1]):
    e = json.loads(line)
    ev = e.get("event")
    if ev == "daemon.started": start = ts(e["timestamp"])
    elif ev == "job.started": starts.append(ts(e["timestamp"]))
    elif ev == "job.finished":
        durations.append(e["duration_ms"])
        fails += e["outcome"] != "success"
jitter = float(sys.argv[2])
rel = sorted(t - start for t in starts)
per10 = collections.Counter(int(r // 10) for r in rel)
per1 = collections.Counter(int(r) for r in rel)
durations.sort()
print(f"jitter: {len(rel)} backups started ({fails} failed), jitter {jitter:.0f} s, first {rel[0]:.1f} s, last {rel[-1]:.1f} s after start")
print("  starts per 10 s: " + " ".join(f"{10*k}-{10*k+10}s:{per10[k]}" for k in sorted(per10)))
print(f"  busiest second: {max(per1.values())} starts; seconds with a start: {len(per1)} of {int(rel[-1])+1}")
print(f"  backup duration median {durations[len(durations)//2]} ms, p99 {durations[int(len(durations)*0.99)]} ms")
EOF
echo "bench-daemon: logs in $WORK (rm -r bench-data/ to clean)" >&2

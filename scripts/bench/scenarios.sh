# Scenarios of scripts/bench.sh other than `mixed` (see its header). Sourced
# by bench.sh after its tool functions (measure, <tool>_setup/_init/_backup/
# _restore/_check, run_tool): those are reused as they are. "$@" are the
# scenario's own arguments. Each scenario writes, under $B/<scenario>/:
#   results.tsv   case, round, tool, phase, wall, user, sys, peak RSS (KiB)
#   requests.tsv  (s3) HTTP requests and body bytes per phase, counted at the proxy
#   sizes.tsv     case, round, tool, repository bytes
#   meta.tsv      the command, date, `uptime` before and after, dataset facts
# then scripts/bench/report.py writes its section of BENCHMARKS.md.

S=$B/$SCENARIO
mkdir -p "$S"
RESULTS=$S/results.tsv
REQUESTS=$S/requests.tsv
SIZES=$S/sizes.tsv
META=$S/meta.tsv
KEEP=${BENCH_KEEP:-0}      # 1: keep datasets and restores (deleted at the end by default)
VERIFY=${BENCH_VERIFY:-1}  # 0: skip comparing restores with the source (diff -r; untimed)
# Peers of these scenarios: restic (borg and rustic take `BENCH_TOOLS=...`).
if [[ -n ${BENCH_TOOLS:-} ]]; then
    read -r -a TOOLS <<<"$BENCH_TOOLS"
else
    TOOLS=(custos)
    command -v restic >/dev/null && TOOLS+=(restic) || log "restic not installed: skipped"
fi

meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }

start_run() {
    printf 'case\tround\ttool\tphase\twall_s\tuser_s\tsys_s\tmaxrss_kib\n' >"$RESULTS"
    printf 'case\tround\ttool\tphase\trequests\tbytes_up\tbytes_down\n' >"$REQUESTS"
    printf 'case\tround\ttool\trepo_bytes\n' >"$SIZES"
    : >"$META"
    meta command "scripts/bench.sh --scenario $SCENARIO $*"
    meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
    meta uptime_before "$(uptime)"
    meta tools "${TOOLS[*]}"
    local t
    for t in "${TOOLS[@]}" zstd; do
        case $t in
        restic) meta version_restic "$(restic version)" ;;
        borg | rustic | zstd) meta "version_$t" "$($t --version | head -1)" ;;
        esac
    done
}

finish_run() {
    meta uptime_after "$(uptime)"
    report
}

report() {
    [[ $OUT == - ]] || python3 "$ROOT/scripts/bench/report.py" "$SCENARIO" "$S" "$OUT"
}

# rotate ROUND: the tools, starting one further each round (no tool always first).
rotate() {
    local n=${#TOOLS[@]} k
    for ((k = 0; k < n; k++)); do printf '%s\n' "${TOOLS[(k + $1 - 1) % n]}"; done
}

# Where each tool puts a full restore of $DATA under $RESTORE.
restored_path() {
    case $1 in
    custos) echo "$RESTORE/data" ;;
    borg) echo "$RESTORE/${DATA#/}" ;;
    *) echo "$RESTORE$DATA" ;;
    esac
}

# --- small and many: one tree of many small files -------------------------------

# files_case CASE COUNT ROUNDS SEED FLOOR MIN MAX: every phase of every tool on one
# generated tree. Phases run tool after tool on the same tree (no per-tool
# copy of millions of files): first backups, then one file changed, then
# incremental backups, restores (each into a fresh directory: see the ext4
# note in TESTING.md), checks.
files_case() {
    CASE=$1
    local count=$2 rounds=$3 seed=$4 floor=$5 min=$6 max=$7 round tool
    local dirs=${BENCH_SMALL_DIRS:-1000}
    DATA=$B/files-$count-$min-$max-$dirs-$seed
    export DATA CASE
    if [[ ! -f $DATA.complete ]]; then
        log "generating $count files of $min–$max bytes in $dirs directories (seed $seed)"
        rm -rf "$DATA"
        local t0=$SECONDS
        "$GEN" small "$count" "$seed" "$DATA" "$min" "$max" "$dirs" >"$S/gen.out"
        cat "$S/gen.out" >&2
        log "generated in $((SECONDS - t0)) s"
        touch "$DATA.complete"
    fi
    meta "dataset_$CASE" "$count files of $min–$max B in $dirs directories, $(awk '{print $4}' "$S/gen.out" 2>/dev/null) bytes (seed $seed)"
    for ((round = 1; round <= rounds; round++)); do
        for tool in $(rotate "$round"); do
            "${tool}_setup"
            "${tool}_init" >/dev/null 2>&1 || die "$tool init failed"
            export BORG_N=1
            measure "$round" "$tool" first "${tool}_backup"
        done
        if ((floor)); then
            measure "$round" "tar|zstd" first bash -c "tar -C '$DATA' -cf - . | zstd -3 -T2 -q -c > '$S/floor.tar.zst'"
        fi
        # From here the tree differs from the generated one: regenerate next time.
        rm -f "$DATA.complete"
        "$GEN" touch-one "$((seed + round))" "$DATA" >&2
        for tool in $(rotate "$round"); do
            BORG_N=2
            measure "$round" "$tool" incremental "${tool}_backup"
        done
        for tool in $(rotate "$round"); do
            RESTORE=$B/restore-$SCENARIO-$count-$tool-r$round
            export RESTORE
            rm -rf "$RESTORE" && mkdir -p "$RESTORE"
            measure "$round" "$tool" restore "${tool}_restore"
        done
        if ((floor)); then
            local r=$B/restore-$SCENARIO-$count-floor-r$round
            rm -rf "$r" && mkdir -p "$r"
            measure "$round" "tar|zstd" restore bash -c "zstd -d -q -c '$S/floor.tar.zst' | tar -C '$r' -xf -"
        fi
        for tool in $(rotate "$round"); do
            measure "$round" "$tool" check "${tool}_check"
            printf '%s\t%s\t%s\t%s\n' "$CASE" "$round" "$tool" "$("${tool}_size")" >>"$SIZES"
        done
        if ((VERIFY)); then
            # The restores must be complete and identical (untimed). The floor's
            # archive predates the one changed file: it is not compared.
            for tool in $(rotate "$round"); do
                RESTORE=$B/restore-$SCENARIO-$count-$tool-r$round
                log "comparing the $tool restore with the source"
                diff -r --no-dereference "$DATA" "$(restored_path "$tool")" >/dev/null ||
                    die "$tool restored something different ($CASE, round $round)"
            done
        fi
    done
}

cleanup_files() {
    ((KEEP)) && return 0
    log "deleting datasets and restores (BENCH_KEEP=1 keeps them)"
    rm -rf "$B"/restore-"$SCENARIO"-* "$S/floor.tar.zst"
    local count
    for count in "$@"; do
        rm -rf "$B"/files-"$count"-*
    done
}

scenario_small() {
    local count=${1:-300000} rounds=${2:-1} seed=${3:-42}
    start_run "$@"
    files_case "$count" "$count" "$rounds" "$seed" 1 "${BENCH_SMALL_MIN:-200}" "${BENCH_SMALL_MAX:-4096}"
    finish_run
    cleanup_files "$count"
}

scenario_many() {
    local counts=${1:-1000000,2000000} rounds=${2:-1} seed=${3:-42} count
    start_run "$@"
    IFS=, read -r -a list <<<"$counts"
    for count in "${list[@]}"; do
        # Small data: the file count, not the bytes, is what this scenario loads.
        files_case "$count" "$count" "$rounds" "$seed" "${BENCH_FLOOR:-0}" \
            "${BENCH_SMALL_MIN:-100}" "${BENCH_SMALL_MAX:-1000}"
    done
    finish_run
    cleanup_files "${list[@]}"
}

# --- s3: s3s-fs on loopback, direct and behind the latency proxy -----------------

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    local _
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1"
}

scenario_s3() {
    local size=${1:-1G} rounds=${2:-1} seed=${3:-42} round tool
    local latency=${BENCH_LATENCY_MS:-20}
    command -v s3s-fs >/dev/null ||
        die "s3s-fs is needed: cargo install s3s-fs --version 0.14.1 --features binary --locked"
    start_run "$@"
    PRISTINE=$B/pristine-$size-$seed
    if [[ ! -f $PRISTINE/.complete ]]; then
        log "generating the $size dataset (seed $seed)"
        rm -rf "$PRISTINE"
        "$GEN" generate "$size" "$seed" "$PRISTINE" >&2
        find "$PRISTINE" -exec touch -h -d '2026-01-01 00:00:00' {} +
        touch "$PRISTINE/.complete"
    fi
    meta dataset "mixed, $(du -sb --exclude=.complete "$PRISTINE" | cut -f1) bytes (seed $seed)"
    meta latency_ms "$latency"
    DATA=$B/data
    RESTORE=$B/restore
    BACKEND=s3
    export DATA RESTORE BACKEND PRISTINE
    SIZES=$S/sizes-unused.tsv # run_tool's rows; object sizes are not read back from S3
    local port pport pids=()
    port=$(free_port)
    rm -rf "$S/s3s-fs" && mkdir -p "$S/s3s-fs"
    s3s-fs --host 127.0.0.1 --port "$port" --access-key AK --secret-key SK "$S/s3s-fs" 2>"$S/s3s-fs.log" &
    pids+=($!)
    # shellcheck disable=SC2064 # the pids are known now
    trap "kill ${pids[*]} 2>/dev/null || true" EXIT
    wait_port "$port"
    export AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SK AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
    export AWS_ALLOW_HTTP=true AWS_EC2_METADATA_DISABLED=true
    meta version_s3s_fs "$(s3s-fs --version 2>/dev/null | head -1)"

    # restic lists its data/ with an empty `delimiter=` parameter, which s3s-fs
    # 0.14.1 takes as a delimiter: no keys come back and `restic check` reports
    # every pack missing. Its check runs on LocalStack only.
    SKIP_PHASES="restic:check"
    meta note "restic check skipped on s3s-fs: restic lists data/ with an empty \`delimiter=\` parameter and s3s-fs 0.14.1 answers with common prefixes and no keys, so every pack reads as missing"
    # 1. Direct to s3s-fs on loopback.
    export AWS_ENDPOINT_URL=http://127.0.0.1:$port
    CASE="s3s-fs"
    for ((round = 1; round <= rounds; round++)); do
        for tool in $(rotate "$round"); do run_tool "$round" "$tool"; done
    done

    # 2. The same server behind the proxy: requests counted, $latency ms added to each.
    pport=$(free_port)
    python3 "$ROOT/scripts/bench/latency-proxy.py" "$pport" "127.0.0.1:$port" "$latency" "$S/proxy.json" 2>"$S/proxy.log" &
    pids+=($!)
    trap "kill ${pids[*]} 2>/dev/null || true" EXIT
    wait_port "$pport"
    export AWS_ENDPOINT_URL=http://127.0.0.1:$pport PROXY_STATS=$S/proxy.json
    CASE="s3s-fs +${latency}ms"
    for ((round = 1; round <= rounds; round++)); do
        for tool in $(rotate "$round"); do run_tool "$round" "$tool"; done
    done
    unset PROXY_STATS SKIP_PHASES

    # 3. LocalStack for comparison (slow to install; BENCH_LOCALSTACK=1).
    if [[ ${BENCH_LOCALSTACK:-0} == 1 ]]; then
        eval "$(CUSTOS_EMULATOR=localstack scripts/emulators.sh start)"
        CASE="localstack"
        for ((round = 1; round <= rounds; round++)); do
            for tool in $(rotate "$round"); do run_tool "$round" "$tool"; done
        done
        scripts/emulators.sh stop >&2 || true
    fi
    kill "${pids[@]}" 2>/dev/null || true
    finish_run
    ((KEEP)) || rm -rf "$DATA" "$S/s3s-fs"
}

# --- tenants: one daemon --once over many small tenants ---------------------------

scenario_tenants() {
    local n=${1:-1000} size=${2:-1M} seed=${3:-42} i
    local jobs=${BENCH_JOBS:-2} singles=${BENCH_SINGLES:-5}
    TOOLS=(custos) # no peer has a multi-tenant daemon
    start_run "$@"
    local w=$S/work # inside the scenario's directory, beside (not over) its results
    rm -rf "$w" && mkdir -p "$w/src" "$w/policies"
    log "generating $n tenants of $size (seeds $((seed + 1))..$((seed + n)))"
    for ((i = 1; i <= n; i++)); do
        "$GEN" generate "$size" "$((seed + i))" "$w/src/$(printf 't%05d' "$i")" >/dev/null
    done
    find "$w/src" -exec touch -h -d '2026-01-01 00:00:00' {} +
    meta dataset "$n tenants, $(du -sb "$w/src" | cut -f1) bytes, $(find "$w/src" -type f | wc -l) files"
    meta max_concurrent_jobs "$jobs"
    # Backups only: retention and check have no schedule, so they are not planned.
    cat >"$w/policies/defaults.toml" <<EOF
key = "local:{tenant}"
[[sources]]
type = "path"
path = "$w/src/{tenant}"
name = "data"
[backup]
schedule = "0 2 * * *"
EOF
    for ((i = 1; i <= n; i++)); do
        printf 'tenant = "t%05d"\n' "$i" >"$w/policies/$(printf 't%05d' "$i").toml"
    done
    cat >"$w/custos.toml" <<EOF
store = "file://$w/store"
state_dir = "$w/state"
policies_dir = "$w/policies"
[local_keys]
dir = "$w/keys"
[daemon]
max_concurrent_jobs = $jobs
EOF
    # The reference: single first backups of one tenant's data into their own
    # store (tenant init untimed, as a user would have run it once).
    mkdir -p "$w/single-policies"
    cp "$w/policies/defaults.toml" "$w/single-policies/"
    cat >"$w/single.toml" <<EOF
store = "file://$w/single-store"
state_dir = "$w/single-state"
policies_dir = "$w/single-policies"
[local_keys]
dir = "$w/single-keys"
EOF
    export W=$w CUSTOS_LOG=warn
    for ((i = 1; i <= singles; i++)); do
        local t
        t=$(printf 't%05d' "$i")
        printf 'tenant = "%s"\n' "$t" >"$w/single-policies/$t.toml"
        "$CUSTOS" --config "$w/single.toml" tenant init "$t" >/dev/null 2>&1 || die "tenant init $t failed"
        CASE=single measure "$i" custos backup "$CUSTOS" --config "$w/single.toml" backup "$t"
    done
    CASE="daemon --once" measure 1 custos "backup $n tenants" \
        bash -c "'$CUSTOS' --config '$w/custos.toml' daemon --once --json > '$S/once.json'"
    python3 - "$S/once.json" >>"$META" <<'PY'
import json, statistics, sys
doc = json.load(open(sys.argv[1]))
doc = doc.get("result", doc)  # the --json envelope
jobs = sorted(doc.get("runs", []), key=lambda j: j.get("started_at", ""))
ok = [j for j in jobs if j.get("outcome") == "success"]
dur = sorted(j["duration_ms"] for j in jobs if j.get("duration_ms") is not None)
print(f"daemon_jobs\t{len(jobs)} jobs, {len(ok)} succeeded")
if dur:
    print(f"daemon_job_ms\tmedian {statistics.median(dur):.0f}, p99 {dur[int(len(dur) * 0.99)]}, max {dur[-1]}")
# Job durations in start order, by tenth: does a job get slower as tenants are done?
tenth = max(1, len(jobs) // 10)
trend = [statistics.median(j["duration_ms"] for j in jobs[i:i + tenth]) for i in range(0, len(jobs), tenth)]
print("daemon_job_ms_by_tenth\t" + ", ".join(f"{v:.0f}" for v in trend))
PY
    finish_run
    ((KEEP)) || rm -rf "$w"
}

if [[ $REPORT_ONLY == 1 ]]; then
    report
else
    "scenario_$SCENARIO" "$@"
fi

#!/usr/bin/env bash
# S3 + KMS emulators for custos tests, without Docker.
#
#   scripts/emulators.sh start    install if needed, start, wait until ready, create
#                                 the test buckets and KMS keys, print `export ...` lines
#   scripts/emulators.sh stop     stop the emulator this script started
#   scripts/emulators.sh status   which emulator runs, its pid and health
#   scripts/emulators.sh env      print the `export ...` lines for the running emulator
#
# Typical use:   eval "$(scripts/emulators.sh start)" && cargo test
#
# LocalStack (host mode, real KMS key states) is preferred; moto is the fallback
# when LocalStack cannot be installed or started. CUSTOS_EMULATOR=localstack|moto
# forces one (no fallback). Everything listens on 127.0.0.1 only, and nothing but
# the package registry (pip) and 127.0.0.1 is ever contacted.
#
# Settings (environment):
#   CUSTOS_EMULATOR      localstack | moto | auto (default: auto = LocalStack, else moto)
#   CUSTOS_EMU_DIR       state directory (default: <repo>/.emu)
#   CUSTOS_LS_PORT       LocalStack port (default 4566)
#   CUSTOS_MOTO_PORT     moto port (default 5000)
#   CUSTOS_EMU_TIMEOUT   seconds to wait for readiness (default 120)
#
# Logs go to stderr; only the export lines go to stdout.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EMU_DIR=${CUSTOS_EMU_DIR:-$ROOT/.emu}
LS_PORT=${CUSTOS_LS_PORT:-4566}
MOTO_PORT=${CUSTOS_MOTO_PORT:-5000}
TIMEOUT=${CUSTOS_EMU_TIMEOUT:-120}
REGION=us-east-1
ACCESS_KEY="test"
SECRET_KEY="test"
TEST_BUCKET=custos-test
BUCKETS=("$TEST_BUCKET" custos-attachments)
KEY_ALIASES=(alias/custos-test-a alias/custos-test-b)

# Exact pins (see shared TESTING.md): localstack-core 2026.3.0 is the last release
# of that package; the others fix dependency drift.
LS_PINS=('localstack-core[runtime]==2026.3.0' 'cbor2<6' 'pyopenssl<26' 'cryptography<47' 'service_identity')
MOTO_PINS=('moto[server]==5.2.5')

LS_VENV=$EMU_DIR/ls
MOTO_VENV=$EMU_DIR/moto
KIND_FILE=$EMU_DIR/kind
LOG_FILE=$EMU_DIR/emu.log

log() { printf 'emulators: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

pid_file() { printf '%s/%s.pid\n' "$EMU_DIR" "$1"; }
port_of() { if [[ $1 == localstack ]]; then echo "$LS_PORT"; else echo "$MOTO_PORT"; fi; }
endpoint_of() { printf 'http://127.0.0.1:%s\n' "$(port_of "$1")"; }

# --- python -------------------------------------------------------------------

# Prints a command (one word per line) that runs a python >= 3.<min_minor>.
find_python() {
    local min_minor=$1 v cand
    local -a cands=()
    if command -v pyenv >/dev/null 2>&1; then
        # Newest first, e.g. 3.13.0 then 3.12.1.
        while IFS= read -r v; do
            [[ $v =~ ^3\.[0-9]+\.[0-9]+$ ]] && cands+=("PYENV_VERSION=$v")
        done < <(pyenv versions --bare 2>/dev/null | sort -t. -k1,1n -k2,2nr -k3,3nr)
    fi
    cands+=(python3.13 python3.12 python3)
    for cand in "${cands[@]}"; do
        local -a cmd
        if [[ $cand == PYENV_VERSION=* ]]; then
            cmd=(env "$cand" python3)
        else
            command -v "$cand" >/dev/null 2>&1 || continue
            cmd=("$cand")
        fi
        if "${cmd[@]}" -c "import sys; sys.exit(0 if sys.version_info >= (3, $min_minor) else 1)" \
            >/dev/null 2>&1; then
            printf '%s\n' "${cmd[@]}"
            return 0
        fi
    done
    return 1
}

# install_venv DIR MIN_MINOR PIN...: creates DIR as a venv and pip-installs the pins,
# unless DIR already holds exactly these pins.
install_venv() {
    local dir=$1 min_minor=$2
    shift 2
    local want="$*" marker=$dir/.custos-pins
    if [[ -x $dir/bin/python && -f $marker && $(<"$marker") == "$want" ]]; then
        return 0
    fi
    local -a py
    mapfile -t py < <(find_python "$min_minor") || true
    ((${#py[@]})) || { log "no python >= 3.$min_minor found (tried pyenv versions, python3.13, python3.12, python3)"; return 1; }
    log "installing into ${dir#"$ROOT"/} with $("${py[@]}" -c 'import sys; print(sys.executable, sys.version.split()[0])'): $want"
    local t0 ilog=$dir.install.log
    t0=$(now)
    rm -rf "$dir"
    mkdir -p "$EMU_DIR"
    if ! "${py[@]}" -m venv "$dir" >"$ilog" 2>&1 \
        || ! "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >>"$ilog" 2>&1; then
        log "install failed after $(elapsed "$t0") s; last lines of $ilog:"
        tail -n 20 "$ilog" >&2
        return 1
    fi
    printf '%s' "$want" >"$marker"
    log "installed ${dir#"$ROOT"/} in $(elapsed "$t0") s"
}

# --- processes ----------------------------------------------------------------

# Prints the pid of our running emulator KIND, if any.
running_pid() {
    local kind=$1 pf pid
    pf=$(pid_file "$kind")
    [[ -f $pf ]] || return 1
    pid=$(<"$pf")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Guard against a recycled pid: the process must still be our emulator.
    [[ -r /proc/$pid/cmdline ]] || return 1
    local pat=moto_server
    [[ $kind == localstack ]] && pat=localstack.runtime.main
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pat" || return 1
    echo "$pid"
}

healthy() {
    local kind=$1 ep body
    ep=$(endpoint_of "$kind")
    if [[ $kind == localstack ]]; then
        body=$(curl -sf --max-time 3 "$ep/_localstack/health" 2>/dev/null) || return 1
        grep -Eq '"kms": *"(available|running)"' <<<"$body" \
            && grep -Eq '"s3": *"(available|running)"' <<<"$body"
    else
        curl -sf --max-time 3 -o /dev/null "$ep/moto-api/" 2>/dev/null
    fi
}

port_busy() {
    # bash's /dev/tcp: succeeds when something accepts on the port.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

launch() {
    local kind=$1 port pid
    port=$(port_of "$kind")
    if port_busy "$port"; then
        die "port $port on 127.0.0.1 is already in use by a process this script did not start; stop it or set CUSTOS_$([[ $kind == localstack ]] && echo LS || echo MOTO)_PORT"
    fi
    mkdir -p "$EMU_DIR"
    : >"$LOG_FILE"
    if [[ $kind == localstack ]]; then
        mkdir -p "$EMU_DIR/ls-fs/tmp"
        # GATEWAY_SERVER=hypercorn binds only 127.0.0.1 (the default binds 0.0.0.0);
        # TMPDIR keeps it from thinking it runs in its own container and wiping /tmp/localstack.
        env GATEWAY_LISTEN="127.0.0.1:$port" LOCALSTACK_HOST="127.0.0.1:$port" GATEWAY_SERVER=hypercorn \
            SERVICES=s3,kms EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 SKIP_SSL_CERT_DOWNLOAD=1 \
            DISABLE_EVENTS=1 \
            FILESYSTEM_ROOT="$EMU_DIR/ls-fs" TMPDIR="$EMU_DIR/ls-fs/tmp" \
            AWS_EC2_METADATA_DISABLED=true \
            setsid nohup "$LS_VENV/bin/python" -m localstack.runtime.main \
            >"$LOG_FILE" 2>&1 </dev/null &
        pid=$!
    else
        env AWS_EC2_METADATA_DISABLED=true \
            setsid nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" \
            >"$LOG_FILE" 2>&1 </dev/null &
        pid=$!
    fi
    echo "$pid" >"$(pid_file "$kind")"
    local t0 deadline
    t0=$(now)
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        if healthy "$kind"; then
            log "$kind ready on $(endpoint_of "$kind") (pid $pid) after $(elapsed "$t0") s"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$kind exited during startup; last lines of ${LOG_FILE#"$ROOT"/}:"
            tail -n 30 "$LOG_FILE" >&2
            rm -f "$(pid_file "$kind")"
            return 1
        fi
        sleep 0.5
    done
    log "$kind not ready after ${TIMEOUT} s; last lines of ${LOG_FILE#"$ROOT"/}:"
    tail -n 30 "$LOG_FILE" >&2
    stop_kind "$kind"
    return 1
}

stop_kind() {
    local kind=$1 pid i
    pid=$(running_pid "$kind") || { rm -f "$(pid_file "$kind")"; return 0; }
    log "stopping $kind (pid $pid)"
    # The emulator leads its own session (setsid), so signal its process group.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$kind did not stop within 10 s; sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pid_file "$kind")"
}

# --- resources ------------------------------------------------------------------

create_buckets() {
    local ep=$1 bucket code out
    out=$(mktemp)
    for bucket in "${BUCKETS[@]}"; do
        code=$(curl -s -o "$out" -w '%{http_code}' --max-time 10 \
            --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
            -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -X PUT "$ep/$bucket") || code=000
        if [[ $code == 200 ]]; then
            log "bucket $bucket ready"
        elif [[ $code == 409 ]] && grep -q BucketAlreadyOwnedByYou "$out"; then
            log "bucket $bucket exists"
        else
            log "creating bucket $bucket failed: HTTP $code $(head -c 400 "$out")"
            rm -f "$out"
            return 1
        fi
    done
    rm -f "$out"
}

# Makes each alias point at an Enabled symmetric key, creating keys as needed.
# Uses the venv's boto3 (both LocalStack's and moto's venvs have it).
create_keys() {
    local ep=$1 python=$2
    env -u AWS_PROFILE -u AWS_SESSION_TOKEN AWS_EC2_METADATA_DISABLED=true \
        "$python" - "$ep" "$REGION" "$ACCESS_KEY" "$SECRET_KEY" "${KEY_ALIASES[@]}" <<'PY' >&2
import sys
import boto3

ep, region, ak, sk, *aliases = sys.argv[1:]
kms = boto3.client("kms", endpoint_url=ep, region_name=region,
                   aws_access_key_id=ak, aws_secret_access_key=sk)
have = {a["AliasName"]: a.get("TargetKeyId")
        for page in kms.get_paginator("list_aliases").paginate() for a in page["Aliases"]}
for alias in aliases:
    target = have.get(alias)
    if target:
        state = kms.describe_key(KeyId=target)["KeyMetadata"]["KeyState"]
        if state == "Enabled":
            print(f"emulators: kms {alias} -> {target} exists")
            continue
    key = kms.create_key(Description=f"custos test key ({alias})",
                         Tags=[{"TagKey": "custos", "TagValue": "test"}])["KeyMetadata"]["KeyId"]
    if target:
        kms.update_alias(AliasName=alias, TargetKeyId=key)
        print(f"emulators: kms {alias} re-pointed to new key {key} (old key was {state})")
    else:
        kms.create_alias(AliasName=alias, TargetKeyId=key)
        print(f"emulators: kms {alias} -> {key} created")
PY
}

setup_resources() {
    local kind=$1 ep python
    ep=$(endpoint_of "$kind")
    python=$LS_VENV/bin/python
    [[ $kind == moto ]] && python=$MOTO_VENV/bin/python
    create_buckets "$ep"
    create_keys "$ep" "$python"
}

# --- subcommands ----------------------------------------------------------------

current_kind() {
    local k
    for k in localstack moto; do
        if running_pid "$k" >/dev/null; then
            echo "$k"
            return 0
        fi
    done
    return 1
}

print_env() {
    local kind=$1
    cat <<EOF
export AWS_ENDPOINT_URL=$(endpoint_of "$kind")
export AWS_ALLOW_HTTP=true
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
export AWS_DEFAULT_REGION=$REGION
export AWS_EC2_METADATA_DISABLED=true
export CUSTOS_TEST_S3_BUCKET=$TEST_BUCKET
export CUSTOS_EMULATOR=$kind
export CUSTOS_TEST_EMULATORS=1
EOF
}

try_start() {
    local kind=$1 t0
    t0=$(now)
    if [[ $kind == localstack ]]; then
        install_venv "$LS_VENV" 12 "${LS_PINS[@]}" || return 1
    else
        install_venv "$MOTO_VENV" 9 "${MOTO_PINS[@]}" || return 1
    fi
    launch "$kind" || return 1
    log "$kind install+start took $(elapsed "$t0") s"
}

cmd_start() {
    local want=${CUSTOS_EMULATOR:-auto} kind
    case $want in
        auto | localstack | moto) ;;
        *) die "CUSTOS_EMULATOR must be localstack, moto or auto, not '$want'" ;;
    esac
    mkdir -p "$EMU_DIR"
    if kind=$(current_kind); then
        if [[ $want == auto || $want == "$kind" ]]; then
            healthy "$kind" || die "$kind runs (pid $(running_pid "$kind")) but is not healthy; run '$0 stop' and start again"
            log "$kind already running on $(endpoint_of "$kind")"
            if [[ $kind == moto && $want == auto ]]; then
                log "note: moto ignores KMS key states; for LocalStack run '$0 stop' then '$0 start'"
            fi
        else
            stop_kind "$kind"
            kind=""
        fi
    else
        kind=""
    fi
    if [[ -z $kind ]]; then
        if [[ $want == moto ]]; then
            try_start moto || die "moto could not be started"
            kind=moto
        elif try_start localstack; then
            kind=localstack
        elif [[ $want == auto ]]; then
            log "LocalStack unavailable; falling back to moto (KMS key states are NOT enforced there)"
            try_start moto || die "neither LocalStack nor moto could be started"
            kind=moto
        else
            die "LocalStack could not be started (CUSTOS_EMULATOR=localstack forbids the moto fallback)"
        fi
    fi
    echo "$kind" >"$KIND_FILE"
    setup_resources "$kind" || die "could not create test buckets/keys on $kind"
    print_env "$kind"
}

cmd_stop() {
    local k
    for k in localstack moto; do
        stop_kind "$k"
    done
    rm -f "$KIND_FILE"
}

cmd_status() {
    local k pid found=0
    for k in localstack moto; do
        if pid=$(running_pid "$k"); then
            found=1
            if healthy "$k"; then
                echo "$k: running, healthy, pid $pid, $(endpoint_of "$k")"
            else
                echo "$k: running, NOT healthy, pid $pid, $(endpoint_of "$k")"
            fi
        fi
    done
    if ((found == 0)); then
        echo "no emulator running (start one with: $0 start)"
        return 3
    fi
}

cmd_env() {
    local kind
    kind=$(current_kind) || die "no emulator running (start one with: $0 start)"
    print_env "$kind"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac

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
#   CUSTOS_LS_PORT       LocalStack port (default: a free loopback port)
#   CUSTOS_MOTO_PORT     moto port (default: a free loopback port)
#   CUSTOS_EMU_TIMEOUT   seconds to wait for readiness (default 120)
#
# Ports: unless CUSTOS_LS_PORT / CUSTOS_MOTO_PORT name one (then that port is
# used, and a port already taken is an error), `start` asks the kernel for a
# free port on 127.0.0.1, so a run never depends on what else listens on the
# machine (another checkout's LocalStack on 4566, a moto on 5000). LocalStack
# also gets a free range for its external-service ports
# (EXTERNAL_SERVICE_PORTS_START/END, 4510-4560 by default). Should another
# process take the port between the choice and the emulator's bind, the
# emulator is stopped and started again on another port. The port in use is
# recorded in CUSTOS_EMU_DIR (<kind>.port), where `stop`, `status` and `env`
# find it; the `export` lines carry it in AWS_ENDPOINT_URL.
#
# Logs go to stderr; only the export lines go to stdout.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EMU_DIR=${CUSTOS_EMU_DIR:-$ROOT/.emu}
# Ports the caller asked for (empty: pick free ones at start).
LS_PORT_WANTED=${CUSTOS_LS_PORT:-}
MOTO_PORT_WANTED=${CUSTOS_MOTO_PORT:-}
# LocalStack's external-service port range: this many ports after the gateway's.
LS_EXT_PORTS=10
# Starts tried when the chosen port is taken before the emulator binds it.
START_ATTEMPTS=4
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
port_file() { printf '%s/%s.port\n' "$EMU_DIR" "$1"; }
wanted_port() { if [[ $1 == localstack ]]; then echo "$LS_PORT_WANTED"; else echo "$MOTO_PORT_WANTED"; fi; }
default_port() { if [[ $1 == localstack ]]; then echo 4566; else echo 5000; fi; }
env_port_name() { if [[ $1 == localstack ]]; then echo CUSTOS_LS_PORT; else echo CUSTOS_MOTO_PORT; fi; }

# The port emulator KIND listens on: the one recorded when it was started; for
# an emulator started before ports were recorded, the one asked for, else the
# old fixed default.
port_of() {
    local kind=$1 f p
    f=$(port_file "$kind")
    if [[ -f $f ]]; then
        p=$(<"$f")
        if [[ $p =~ ^[0-9]+$ ]]; then
            echo "$p"
            return 0
        fi
    fi
    p=$(wanted_port "$kind")
    echo "${p:-$(default_port "$kind")}"
}
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

# A python for the small helpers below (the system's, else a venv's).
helper_python() {
    local p
    for p in python3 "$LS_VENV/bin/python" "$MOTO_VENV/bin/python"; do
        if command -v "$p" >/dev/null 2>&1; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# free_ports N: prints P such that 127.0.0.1:P .. P+N-1 are all free now. P is
# what the kernel hands out for a bind to port 0; the others are checked by
# binding them (all held at once, then released).
free_ports() {
    local n=$1 py
    py=$(helper_python) || { log "no python3 to pick a free port with"; return 1; }
    "$py" - "$n" <<'PY'
import socket
import sys

n = int(sys.argv[1])
for _ in range(50):
    held = []
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.append(s)
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        if base + n - 1 > 65535:
            continue
        for p in range(base + 1, base + n):
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(t)
            t.bind(("127.0.0.1", p))
        print(base)
        sys.exit(0)
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
sys.exit("no free block of %d ports on 127.0.0.1" % n)
PY
}

# port_owner PGID PORT: who listens on PORT (any local address): `ours` (a
# process of process group PGID, the emulator this script started with
# setsid), `other`, or `none`.
port_owner() {
    local py
    py=$(helper_python) || { echo unknown; return 0; }
    "$py" - "$1" "$2" <<'PY'
import os
import sys

pgid, port = int(sys.argv[1]), int(sys.argv[2])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        f = row.split()
        if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f[9])
if not inodes:
    print("none")
    sys.exit(0)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open("/proc/%s/stat" % pid).read()
        if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
            continue
        for fd in os.listdir("/proc/%s/fd" % pid):
            try:
                link = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                print("ours")
                sys.exit(0)
    except (OSError, ValueError, IndexError):
        continue
print("other")
PY
}

# launch KIND: starts KIND on the port asked for, else on a free one, and
# waits until it is healthy. Returns 0 when ready, 1 on failure.
launch() {
    local kind=$1 wanted attempt rc
    wanted=$(wanted_port "$kind")
    for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
        rc=0
        launch_once "$kind" "$wanted" || rc=$?
        case $rc in
            0) return 0 ;;
            2)
                # Lost the race for a port we picked: pick another.
                [[ -z $wanted ]] || return 1
                log "retrying $kind on another port (attempt $((attempt + 1)) of $START_ATTEMPTS)"
                ;;
            *) return 1 ;;
        esac
    done
    log "$kind: no free port could be kept after $START_ATTEMPTS attempts"
    return 1
}

# launch_once KIND WANTED: one start. Returns 0 when ready, 2 when the port
# was taken by another process before the emulator bound it, 1 otherwise.
launch_once() {
    local kind=$1 wanted=$2 port pid ext_start="" ext_end="" base owner
    if [[ -n $wanted ]]; then
        [[ $wanted =~ ^[0-9]+$ ]] && ((wanted > 0 && wanted < 65536)) \
            || die "$(env_port_name "$kind") must be a port number, not '$wanted'"
        port=$wanted
        if port_busy "$port"; then
            die "port $port on 127.0.0.1 is already in use by a process this script did not start; stop it, or unset $(env_port_name "$kind") to use a free port"
        fi
        if [[ $kind == localstack ]]; then
            base=$(free_ports "$LS_EXT_PORTS") || return 1
            ext_start=$base
            ext_end=$((base + LS_EXT_PORTS - 1))
        fi
    elif [[ $kind == localstack ]]; then
        # The gateway, then its external-service range, in one free block.
        base=$(free_ports $((LS_EXT_PORTS + 1))) || return 1
        port=$base
        ext_start=$((base + 1))
        ext_end=$((base + LS_EXT_PORTS))
    else
        port=$(free_ports 1) || return 1
    fi
    mkdir -p "$EMU_DIR"
    : >"$LOG_FILE"
    echo "$port" >"$(port_file "$kind")"
    if [[ $kind == localstack ]]; then
        mkdir -p "$EMU_DIR/ls-fs/tmp"
        # GATEWAY_SERVER=hypercorn binds only 127.0.0.1 (the default binds 0.0.0.0);
        # TMPDIR keeps it from thinking it runs in its own container and wiping /tmp/localstack.
        # DNS_ADDRESS=0 starts no DNS server (port 53); EXTERNAL_SERVICE_PORTS_* move the
        # range LocalStack hands to external services off its shared default 4510-4560.
        env GATEWAY_LISTEN="127.0.0.1:$port" LOCALSTACK_HOST="127.0.0.1:$port" GATEWAY_SERVER=hypercorn \
            EXTERNAL_SERVICE_PORTS_START="$ext_start" EXTERNAL_SERVICE_PORTS_END="$ext_end" \
            SERVICES=s3,kms EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 SKIP_SSL_CERT_DOWNLOAD=1 \
            DISABLE_EVENTS=1 \
            FILESYSTEM_ROOT="$EMU_DIR/ls-fs" TMPDIR="$EMU_DIR/ls-fs/tmp" \
            AWS_EC2_METADATA_DISABLED=true \
            setsid nohup "$LS_VENV/bin/python" -m localstack.runtime.main \
            >"$LOG_FILE" 2>&1 </dev/null &
        pid=$!
        log "starting localstack on 127.0.0.1:$port (external-service ports $ext_start-$ext_end)"
    else
        env AWS_EC2_METADATA_DISABLED=true \
            setsid nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" \
            >"$LOG_FILE" 2>&1 </dev/null &
        pid=$!
        log "starting moto on 127.0.0.1:$port"
    fi
    echo "$pid" >"$(pid_file "$kind")"
    local t0 deadline
    t0=$(now)
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        # Someone else's listener on our port: we lost the race for it (and a
        # health check would be answered by that process, not ours).
        owner=$(port_owner "$pid" "$port") || owner=unknown
        if [[ $owner == other ]]; then
            log "port $port was taken by another process before $kind could bind it"
            stop_kind "$kind"
            rm -f "$(port_file "$kind")"
            return 2
        fi
        if [[ $owner != none ]] && healthy "$kind"; then
            log "$kind ready on $(endpoint_of "$kind") (pid $pid) after $(elapsed "$t0") s"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            if grep -Eqi 'address already in use|errno 98' "$LOG_FILE"; then
                log "$kind could not bind port $port (already in use)"
                rm -f "$(pid_file "$kind")" "$(port_file "$kind")"
                return 2
            fi
            log "$kind exited during startup; last lines of ${LOG_FILE#"$ROOT"/}:"
            tail -n 30 "$LOG_FILE" >&2
            rm -f "$(pid_file "$kind")" "$(port_file "$kind")"
            return 1
        fi
        sleep 0.5
    done
    log "$kind not ready after ${TIMEOUT} s; last lines of ${LOG_FILE#"$ROOT"/}:"
    tail -n 30 "$LOG_FILE" >&2
    stop_kind "$kind"
    rm -f "$(port_file "$kind")"
    return 1
}

stop_kind() {
    local kind=$1 pid i
    pid=$(running_pid "$kind") || { rm -f "$(pid_file "$kind")" "$(port_file "$kind")"; return 0; }
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
    rm -f "$(pid_file "$kind")" "$(port_file "$kind")"
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
            if [[ -n $(wanted_port "$kind") && $(wanted_port "$kind") != $(port_of "$kind") ]]; then
                log "note: it runs on port $(port_of "$kind"), not $(env_port_name "$kind")=$(wanted_port "$kind"); run '$0 stop' then '$0 start' to move it"
            fi
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

#!/usr/bin/env bash
# A PyKMIP server on loopback: the KMIP key manager the KMIP provider's tests
# run against (docs/keys-you-hold.md, "KMIP operations").
#
#   scripts/pykmip.sh start   installs PyKMIP if needed (Debian python3-pykmip,
#                             else pip into .emu/pykmip), makes a throwaway CA,
#                             a server certificate (subjectAltName IP:127.0.0.1)
#                             and a client certificate with openssl, starts
#                             pykmip-server on a free loopback port, waits until
#                             it listens and prints `export` lines:
#                             CUSTOS_TEST_KMIP_SERVER, _CA, _CERT, _KEY.
#   scripts/pykmip.sh stop    stops it (SIGINT: SIGTERM leaves it running).
#
# Everything lives in .emu/pykmip-run (certificates, database, log); every
# start makes a fresh CA and an empty database. Progress goes to stderr, the
# export lines alone to stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=$PWD/.emu/pykmip-run
VENV=$PWD/.emu/pykmip
PIDFILE=$DIR/server.pid

log() { echo "pykmip.sh: $*" >&2; }

server_bin() {
    if command -v pykmip-server >/dev/null 2>&1; then
        command -v pykmip-server
    elif [[ -x $VENV/bin/pykmip-server ]]; then
        echo "$VENV/bin/pykmip-server"
    else
        return 1
    fi
}

install() {
    server_bin >/dev/null && return 0
    if command -v apt-get >/dev/null 2>&1 && apt-cache show python3-pykmip >/dev/null 2>&1; then
        log "installing python3-pykmip (Debian)"
        local sudo=()
        [[ $(id -u) == 0 ]] || sudo=(sudo -n)
        if "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pykmip >&2; then
            server_bin >/dev/null && return 0
        fi
        log "apt-get could not install python3-pykmip; trying pip"
    fi
    log "installing PyKMIP with pip into $VENV"
    python3 -m venv "$VENV"
    # PyKMIP 0.10 uses ssl.wrap_socket, gone in Python 3.12: the venv is made
    # from the default python3 (Debian 12: 3.11).
    "$VENV/bin/pip" install -q 'pykmip==0.10.0' 'sqlalchemy<2' >&2
    server_bin >/dev/null
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ECDSA (P-256) certificates: PyKMIP's TLS 1.2 suite offers AES-GCM only with
# ECDHE-ECDSA, and rustls (custos's TLS) speaks no CBC suite.
make_certs() {
    local d=$1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=custos test KMIP CA" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
    # PyKMIP takes the client's identity from the certificate's CN.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=custos" \
        -keyout "$d/client.key" -out "$d/client.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > "$d/client.ext"
    openssl x509 -req -in "$d/client.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -extfile "$d/client.ext" -out "$d/client.crt" 2>/dev/null
    # A second CA nobody uses: tests check that custos refuses the server under it.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=custos test other CA" \
        -keyout "$d/other-ca.key" -out "$d/other-ca.crt" 2>/dev/null
    chmod 600 "$d"/*.key
}

listening() {
    python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",int(sys.argv[1])),1); s.close()' "$1" 2>/dev/null
}

start() {
    stop_quietly
    install || { log "cannot install PyKMIP"; exit 1; }
    rm -rf "$DIR"
    mkdir -p "$DIR/policies"
    chmod 700 "$DIR"
    make_certs "$DIR"
    local port
    port=${CUSTOS_PYKMIP_PORT:-$(free_port)}
    cat > "$DIR/server.conf" <<EOF
[server]
hostname=127.0.0.1
port=$port
certificate_path=$DIR/server.crt
key_path=$DIR/server.key
ca_path=$DIR/ca.crt
auth_suite=TLS1.2
policy_path=$DIR/policies
enable_tls_client_auth=True
tls_cipher_suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
logging_level=INFO
database_path=$DIR/pykmip.db
EOF
    local bin
    bin=$(server_bin)
    log "starting $bin on 127.0.0.1:$port"
    setsid "$bin" -f "$DIR/server.conf" -l "$DIR/server.log" > "$DIR/stdout.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 60); do
        if listening "$port"; then
            log "listening on 127.0.0.1:$port"
            echo "export CUSTOS_TEST_KMIP_SERVER=127.0.0.1:$port"
            echo "export CUSTOS_TEST_KMIP_CA=$DIR/ca.crt"
            echo "export CUSTOS_TEST_KMIP_CERT=$DIR/client.crt"
            echo "export CUSTOS_TEST_KMIP_KEY=$DIR/client.key"
            echo "export CUSTOS_TEST_KMIP_OTHER_CA=$DIR/other-ca.crt"
            return 0
        fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            log "pykmip-server exited:"; cat "$DIR/stdout.log" "$DIR/server.log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
    log "pykmip-server did not listen within 30 s"; cat "$DIR/server.log" >&2 2>/dev/null || true
    stop_quietly
    exit 1
}

stop_quietly() {
    [[ -f $PIDFILE ]] || return 0
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

case ${1:-} in
    start) start ;;
    stop) stop_quietly; log "stopped" ;;
    *) echo "usage: scripts/pykmip.sh start|stop" >&2; exit 2 ;;
esac

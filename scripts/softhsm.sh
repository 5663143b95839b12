#!/usr/bin/env bash
# A SoftHSM2 token for custos's PKCS#11 tests (the HSM stand-in).
#
#   scripts/softhsm.sh start   install softhsm2 + opensc if missing, make a fresh
#                              token directory, initialise a token with a random
#                              SO PIN and user PIN (written to 0600 files there),
#                              print `export ...` lines
#   scripts/softhsm.sh stop    remove the token directory (SoftHSM2 runs no server:
#                              nothing is left running)
#   scripts/softhsm.sh env     print the `export ...` lines of the existing token
#
# Typical use:   eval "$(scripts/softhsm.sh start)" && cargo test --features test-hooks
#
# The tests read:
#   CUSTOS_TEST_PKCS11_MODULE    the PKCS#11 module (shared library)
#   CUSTOS_TEST_PKCS11_TOKEN     the token label
#   CUSTOS_TEST_PKCS11_PIN_FILE  a file holding the user PIN (mode 0600)
#   SOFTHSM2_CONF                SoftHSM2's configuration (its token directory)
# To run the same tests against a real HSM, export the first three yourself
# (module, token label, PIN file of a test partition: the tests create and
# destroy keys labelled custos-test-*) and do not run this script.
#
# Settings (environment):
#   CUSTOS_SOFTHSM_DIR    token directory (default: <repo>/.emu/softhsm)
#   CUSTOS_SOFTHSM_TOKEN  token label (default: custos-test)
#
# Logs go to stderr; only the export lines go to stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${CUSTOS_SOFTHSM_DIR:-$ROOT/.emu/softhsm}
TOKEN=${CUSTOS_SOFTHSM_TOKEN:-custos-test}

log() { echo "softhsm.sh: $*" >&2; }

find_module() {
    local m
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
        if [[ -f $m ]]; then
            echo "$m"
            return 0
        fi
    done
    return 1
}

install() {
    if command -v softhsm2-util >/dev/null 2>&1 && command -v pkcs11-tool >/dev/null 2>&1 && find_module >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "softhsm2 and opensc are missing and there is no apt-get to install them"
        exit 1
    fi
    log "installing softhsm2 and opensc"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc) >&2
}

print_env() {
    local module
    module=$(find_module) || { log "no libsofthsm2.so found"; exit 1; }
    if [[ ! -f $DIR/softhsm2.conf || ! -f $DIR/user.pin ]]; then
        log "no token in $DIR: run scripts/softhsm.sh start"
        exit 1
    fi
    printf 'export SOFTHSM2_CONF=%q\n' "$DIR/softhsm2.conf"
    printf 'export CUSTOS_TEST_PKCS11_MODULE=%q\n' "$module"
    printf 'export CUSTOS_TEST_PKCS11_TOKEN=%q\n' "$TOKEN"
    printf 'export CUSTOS_TEST_PKCS11_PIN_FILE=%q\n' "$DIR/user.pin"
}

random_pin() {
    # 16 hex digits from the kernel's RNG: never a fixed test PIN.
    od -An -N8 -tx1 /dev/urandom | tr -d ' \n'
}

start() {
    install
    rm -rf "$DIR"
    mkdir -p "$DIR/tokens"
    chmod 700 "$DIR" "$DIR/tokens"
    (
        umask 077
        printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$DIR/tokens" > "$DIR/softhsm2.conf"
        random_pin > "$DIR/so.pin"
        random_pin > "$DIR/user.pin"
    )
    export SOFTHSM2_CONF=$DIR/softhsm2.conf
    softhsm2-util --init-token --free --label "$TOKEN" \
        --so-pin "$(cat "$DIR/so.pin")" --pin "$(cat "$DIR/user.pin")" >&2
    # The token must answer a login before the tests count on it.
    local module
    module=$(find_module)
    pkcs11-tool --module "$module" --token-label "$TOKEN" --login \
        --pin "$(cat "$DIR/user.pin")" --list-objects >/dev/null 2>&1 \
        || { log "the new token does not accept its PIN"; exit 1; }
    log "token $TOKEN ready in $DIR (module $module)"
    print_env
}

case ${1:-} in
    start) start ;;
    stop) rm -rf "$DIR"; log "removed $DIR" ;;
    env) print_env ;;
    *) echo "usage: scripts/softhsm.sh start|stop|env" >&2; exit 2 ;;
esac

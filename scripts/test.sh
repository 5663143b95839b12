#!/usr/bin/env bash
# Runs every test of custos: starts the S3 + KMS emulators (LocalStack, else
# moto), a KMIP key manager (PyKMIP, scripts/pykmip.sh) on loopback and a
# SoftHSM2 token (scripts/softhsm.sh), then the whole cargo test suite with
# the emulator, key-manager and token tests switched on (they fail, never
# skip, when CUSTOS_TEST_EMULATORS=1).
#
# The emulators get free loopback ports (unless CUSTOS_LS_PORT / CUSTOS_MOTO_PORT
# name them), so a run does not depend on what else listens on the machine,
# e.g. another checkout's LocalStack on 4566; the tests take the endpoint from
# AWS_ENDPOINT_URL, which the emulators' `export` lines set to that port.
# This is the README's test command and exactly what CI (.ci/run) runs. It
# first runs scripts/check-default-build.sh (the shipped build ignores the
# test hooks' variables), then the suite with `--features test-hooks`, then
# scripts/test-package.sh (the Debian package).
#
# To test against a real MinIO + LocalStack/AWS instead, export the AWS_* and
# CUSTOS_TEST_* variables yourself and set CUSTOS_EXTERNAL_EMULATORS=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .emu

need() { command -v "$1" >/dev/null 2>&1; }
if ! need sqlite3; then
    echo "test.sh: installing sqlite3 (the drill example tenant backs up a SQLite database)" >&2
    if need apt-get; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3) >&2
    fi
    need sqlite3 || { echo "test.sh: sqlite3 is required" >&2; exit 1; }
fi

# The Prometheus alert rules and their unit tests (contrib/prometheus/);
# Debian's prometheus package ships promtool. Never skipped.
if ! need promtool; then
    echo "test.sh: installing prometheus (for promtool: the alert rules' unit tests)" >&2
    if need apt-get; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >&2
    fi
    need promtool || { echo "test.sh: promtool is required (apt-get install prometheus)" >&2; exit 1; }
fi
promtool check rules contrib/prometheus/alerts.yml
(cd contrib/prometheus && promtool test rules alerts_test.yml)

started_here=0
softhsm_here=0
kmip_here=0
stop_servers() {
    if [[ $started_here == 1 ]]; then scripts/emulators.sh stop >/dev/null 2>&1 || true; fi
    if [[ $softhsm_here == 1 ]]; then scripts/softhsm.sh stop >/dev/null 2>&1 || true; fi
    if [[ $kmip_here == 1 ]]; then scripts/pykmip.sh stop >/dev/null 2>&1 || true; fi
}
trap stop_servers EXIT

# The Debian packages of the token and key-manager tests, in one apt-get run
# before anything starts in the background (two apt-gets at once fight over
# dpkg's lock). The scripts below install what is still missing themselves.
if need apt-get; then
    pkgs=()
    if [[ -z ${CUSTOS_TEST_PKCS11_MODULE:-} ]]; then
        need softhsm2-util || pkgs+=(softhsm2)
        need pkcs11-tool || pkgs+=(opensc)
    fi
    if [[ ${CUSTOS_EXTERNAL_KMIP:-0} != 1 ]] && ! need pykmip-server; then
        pkgs+=(python3-pykmip)
    fi
    if ((${#pkgs[@]})); then
        echo "test.sh: installing ${pkgs[*]}" >&2
        apt-get update -qq >&2 || true
        # python3-pykmip may be missing from the archive: pykmip.sh then uses pip.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2 \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc >&2 || true
    fi
fi
if [[ ${CUSTOS_EXTERNAL_EMULATORS:-0} != 1 ]]; then
    # Install and start the emulators while cargo builds the tests.
    scripts/emulators.sh start > .emu/env.sh 2> .emu/start.log &
    emu_pid=$!
    started_here=1
fi

# A PKCS#11 token (SoftHSM2, initialised with random PINs) for the PKCS#11
# provider's tests, unless CUSTOS_TEST_PKCS11_MODULE already names a module
# (a real HSM: export CUSTOS_TEST_PKCS11_MODULE, _TOKEN and _PIN_FILE).
if [[ -z ${CUSTOS_TEST_PKCS11_MODULE:-} ]]; then
    scripts/softhsm.sh start > .emu/softhsm.env
    # shellcheck disable=SC1091
    source .emu/softhsm.env
    softhsm_here=1
    echo "test.sh: PKCS#11 token $CUSTOS_TEST_PKCS11_TOKEN (SoftHSM2)" >&2
fi

# The KMIP key manager (PyKMIP, with a throwaway CA): unless CUSTOS_TEST_KMIP_*
# already name one (a real key manager), as CUSTOS_EXTERNAL_KMIP=1 says.
if [[ ${CUSTOS_EXTERNAL_KMIP:-0} != 1 ]]; then
    scripts/pykmip.sh start > .emu/kmip-env.sh 2> .emu/kmip-start.log &
    kmip_pid=$!
    kmip_here=1
fi

# A Python with the format's primitives, for the independent-implementation test.
if [[ ! -x .emu/pyfmt/bin/python ]] || ! .emu/pyfmt/bin/python -c 'import cryptography, blake3, zstandard' 2>/dev/null; then
    python3 -m venv .emu/pyfmt
    .emu/pyfmt/bin/pip install -q 'cryptography>=42' 'blake3>=0.4' 'zstandard>=0.22' >&2
fi
export CUSTOS_TEST_PYTHON=$PWD/.emu/pyfmt/bin/python

# A clean checkout (CI) builds everything once: incremental compilation
# would only add work there. A developer's re-runs keep it.
if [[ ! -d target/debug ]]; then
    export CARGO_INCREMENTAL=0
fi

# The shipped (default-feature) build ignores the test hooks' variables. Its
# control step builds the tests with `--features test-hooks` (fault stores,
# key faults, crash points, fuzz entry points, KMS test keys: only a
# test-hooks build has them), which leaves target/debug/custos built with
# them, for the tests below.
scripts/check-default-build.sh

if [[ $started_here == 1 ]]; then
    if ! wait "$emu_pid"; then
        cat .emu/start.log >&2
        echo "test.sh: the S3 + KMS emulators did not start; emulator tests cannot run" >&2
        exit 1
    fi
    cat .emu/start.log >&2
    # shellcheck disable=SC1091
    source .emu/env.sh
    echo "test.sh: emulator $CUSTOS_EMULATOR at $AWS_ENDPOINT_URL" >&2
fi
if [[ $kmip_here == 1 ]]; then
    if ! wait "$kmip_pid"; then
        cat .emu/kmip-start.log >&2
        echo "test.sh: the PyKMIP server did not start; KMIP tests cannot run" >&2
        exit 1
    fi
    cat .emu/kmip-start.log >&2
    # shellcheck disable=SC1091
    source .emu/kmip-env.sh
    echo "test.sh: KMIP server at $CUSTOS_TEST_KMIP_SERVER" >&2
fi
export CUSTOS_TEST_EMULATORS=1 AWS_EC2_METADATA_DISABLED=true

# Most tests wait on child processes, servers and timers rather than compute:
# measured on the 2-core VM, the integration binary took 286 s with 2 test
# threads and 189 s with 4, using 164 s of CPU. RUST_TEST_THREADS overrides.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}
cargo test --locked --features test-hooks "$@"

# The Debian package, built and checked without installing it
# (scripts/test-package.sh). From the debug binary scripts/check-default-build.sh
# built above (default features, so cargo only links it again): measured on
# the shared 2-core VM, the check takes 14 s, while a release build from
# scratch took 35 min (16 min of CPU). A package to ship is a release build:
# scripts/package-deb.sh.
CUSTOS_PACKAGE_PROFILE=debug scripts/test-package.sh

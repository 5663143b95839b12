#!/usr/bin/env bash
# Proves that the shipped build carries no test hooks (src/hooks.rs): an
# environment variable must never make a production backup fail or crash.
#
#   scripts/check-default-build.sh     (scripts/test.sh runs it first)
#
# 1. Builds custos with the default features (no `test-hooks`) and finds none
#    of the hook variables' names, nor the fault injectors, in the binary.
# 2. With that binary, backs up a tree, restores it and shreds the tenant with
#    CUSTOS_FAULTS (every store call fails), CUSTOS_KEY_FAULTS (the key
#    provider is unreachable), CUSTOS_CRASH_AT (abort at the first local
#    key write, then at the shred's first step) and CUSTOS_NOW (a fake clock
#    in 2001) set: every command must exit 0, the restore must be byte-exact
#    and no audit record may carry the fake time.
# 3. Control: builds the tests with `--features test-hooks` (`cargo test
#    --no-run`, which also builds target/debug/custos with the hooks: the
#    binary the integration tests run, so CI compiles custos with the hooks
#    once, not twice) and shows that the same variables do fail that backup,
#    so step 2 tested something.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --locked --bin custos >&2
bin=$work/custos-default
cp target/debug/custos "$bin"

# Names only test-hooks code holds (the variables, the injectors' types).
if grep -aoE 'CUSTOS_(FAULTS|KEY_FAULTS|CRASH_AT|NOW|INDEX_FILE_BLOBS|CHECK_WINDOW|RESTORE_BATCH_FILES)|FaultyStore|FaultyKeyProvider' "$bin" | sort -u | grep .; then
    echo "check-default-build: the default binary holds test-hook code (above)" >&2
    exit 1
fi

mkdir -p "$work/policies" "$work/data/dir" "$work/restored"
cat > "$work/custos.toml" <<EOF
store = "file://$work/store"
state_dir = "$work/state"
policies_dir = "$work/policies"
[local_keys]
dir = "$work/keys"
EOF
cat > "$work/policies/acme.toml" <<EOF
tenant = "acme"
key = "local:acme"
[[sources]]
type = "path"
path = "$work/data"
name = "data"
EOF
head -c 3000000 /dev/urandom > "$work/data/dir/random.bin"
printf 'hello\n' > "$work/data/hello.txt"

hostile=(CUSTOS_FAULTS=seed=1,error=1 CUSTOS_KEY_FAULTS=unreachable CUSTOS_NOW=2001-01-01T00:00:00Z)
run() { # run BINARY CRASH_AT ARGS...: the binary with the hostile variables set
    local b=$1 crash=$2
    shift 2
    env "${hostile[@]}" CUSTOS_CRASH_AT="$crash" CUSTOS_LOG=warn \
        "$b" --config "$work/custos.toml" "$@"
}

run "$bin" local-key:written backup acme >&2
run "$bin" local-key:written restore acme latest --target "$work/restored" >&2
# A path source restores under its name (`data`).
diff -r --no-dereference "$work/data" "$work/restored/data"
run "$bin" shred:fence shred acme --confirm acme >/dev/null # stdout: the certificate
# The fake clock is a test hook too: the audit log keeps the real time.
if grep -q '"time":"2001-' "$work/state/audit/log.jsonl"; then
    echo "check-default-build: the default build stamped audit records with CUSTOS_NOW" >&2
    exit 1
fi
echo "check-default-build: the default build ignored CUSTOS_FAULTS, CUSTOS_KEY_FAULTS, CUSTOS_CRASH_AT and CUSTOS_NOW" >&2

# Control: a test-hooks build fails the same backup (a fresh tenant).
cargo test --locked --features test-hooks --no-run >&2
sed -i 's/"acme"/"beta"/; s/local:acme/local:beta/' "$work/policies/acme.toml"
mv "$work/policies/acme.toml" "$work/policies/beta.toml"
if run target/debug/custos local-key:written backup beta 2>/dev/null; then
    echo "check-default-build: the test-hooks build ignored the variables too: the check proves nothing" >&2
    exit 1
fi
echo "check-default-build: a test-hooks build fails that backup, as it should" >&2

#!/usr/bin/env bash
# rss-ab.sh BIN NAME DATA: one custos binary through the phases of the `many`
# scenario (tenant init, first backup, touch-one, incremental backup, restore,
# check --read-data) on the tree DATA (made by `bench_dataset small`), printing
# wall time and peak RSS per phase. Run it for two binaries on the same tree to
# compare them (BENCH_GEN: the bench_dataset binary; WORK: where repos go).
set -euo pipefail
BIN=$1 NAME=$2 DATA=$3
c=${WORK:-/tmp/custos-rss-ab}/$NAME
rm -rf "$c"
# shellcheck source=custos-config.sh
source "$(dirname "${BASH_SOURCE[0]}")/custos-config.sh"
custos_write_config "$c" "file://$c/store" "$DATA"
export CUSTOS_LOG=warn
m() { local phase=$1; shift; /usr/bin/time -f "%e %M" -o "$c/t" "$@" >/dev/null 2>"$c/err" || { cat "$c/err"; exit 1; }; read -r wall rss < "$c/t"; printf '%s\t%s\t%s\t%s MiB\n' "$NAME" "$phase" "$wall" "$((rss/1024))"; }
"$BIN" --config "$c/custos.toml" tenant init bench >/dev/null 2>&1
m first "$BIN" --config "$c/custos.toml" backup bench
"${BENCH_GEN:?BENCH_GEN: the bench_dataset binary}" touch-one 7 "$DATA" >/dev/null
m incremental "$BIN" --config "$c/custos.toml" backup bench
rm -rf "$c/restore"; mkdir -p "$c/restore"
m restore "$BIN" --config "$c/custos.toml" restore bench latest --target "$c/restore"
rm -rf "$c/restore"
m check "$BIN" --config "$c/custos.toml" check bench --read-data
echo "$NAME index files: $(ls "$c/store/tenants/bench/index" 2>/dev/null | wc -l)"

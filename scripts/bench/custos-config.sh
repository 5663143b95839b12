# Sourced by bench.sh and bench/rss-ab.sh: the one custos configuration both
# measure. custos_write_config DIR STORE DATA writes DIR/custos.toml (store
# STORE, state and keys under DIR) and the policy of tenant `bench` backing up
# the tree DATA.
custos_write_config() {
    local c=$1 store=$2 data=$3
    mkdir -p "$c/policies"
    cat >"$c/custos.toml" <<EOF_CONFIG
store = "$store"
state_dir = "$c/state"
policies_dir = "$c/policies"
[local_keys]
dir = "$c/keys"
EOF_CONFIG
    cat >"$c/policies/bench.toml" <<EOF_POLICY
tenant = "bench"
key = "local:bench"
[[sources]]
type = "path"
path = "$data"
name = "data"
[retention]
keep_last = 10
EOF_POLICY
}

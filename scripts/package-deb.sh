#!/usr/bin/env bash
# Builds the Debian package of custos with dpkg-deb from a staged tree (no
# cargo-deb, nothing downloaded: cargo builds from the crates it already has):
#
#   scripts/package-deb.sh [OUT_DIR]      (default target/debian)
#
# and prints the path of the .deb on stdout. What it holds:
#
#   /usr/bin/custos                             default features: no test hooks
#   /usr/lib/systemd/system/                    systemd/custos.service, custos-drill@.service
#   /etc/custos/custos.toml                     conffiles: contrib/deb/custos.toml,
#   /etc/custos/policies/defaults.toml            policies/defaults.toml,
#   /etc/custos/policies/acme.toml.example        contrib/deb/acme.toml.example
#   /usr/share/man/man1/custos*.1.gz            `custos man --out`
#   /usr/share/bash-completion/completions/custos, /usr/share/zsh/vendor-completions/_custos,
#   /usr/share/fish/vendor_completions.d/custos.fish    `custos completions SHELL`
#   /usr/share/doc/custos/                      README.md, docs/, policies/, contrib/ (the
#                                               alert rules, the dashboard), copyright
#
# The man pages and completions come from the binary being packaged (its own
# clap definitions). The docs keep the repository's layout and stay
# uncompressed, so the README's links and the units' Documentation= paths
# (file:///usr/share/doc/custos/docs/…) resolve. Units go to /usr/lib/systemd
# (systemd reads it on merged and split /usr alike). Maintainer scripts:
# contrib/deb/post{inst,rm}, prerm (no user to create: the units use
# DynamicUser=).
#
# CUSTOS_PACKAGE_PROFILE: release (default; what ships) or debug (a test
#     build: scripts/test-package.sh in CI, where the test run built it).
# CUSTOS_PACKAGE_MAINTAINER: the Maintainer field (default below).
# CUSTOS_PACKAGE_COMPRESSION: dpkg-deb's -Z (default xz, which every dpkg
#     reads; the test uses gzip, much faster on a large debug binary).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
umask 022

profile=${CUSTOS_PACKAGE_PROFILE:-release}
maintainer=${CUSTOS_PACKAGE_MAINTAINER:-custos maintainers <custos-maintainers@invalid>}
compression=${CUSTOS_PACKAGE_COMPRESSION:-xz}
out=${1:-target/debian}

die() { echo "package-deb: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1; }

case $profile in
release) cargo_profile=(--release) ;;
debug) cargo_profile=() ;;
*) die "CUSTOS_PACKAGE_PROFILE must be release or debug, not '$profile'" ;;
esac
if ! need dpkg-shlibdeps; then
    echo "package-deb: installing dpkg-dev (dpkg-shlibdeps computes Depends)" >&2
    if need apt-get; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev) >&2
    fi
    need dpkg-shlibdeps || die "dpkg-shlibdeps is required (apt-get install dpkg-dev)"
fi
for tool in dpkg-deb python3 gzip md5sum strip; do
    need "$tool" || die "$tool is required"
done

cargo build --locked "${cargo_profile[@]}" --bin custos >&2
bin=target/$profile/custos
version=$("$bin" --version | awk '$1 == "custos" { print $2 }')
[[ $version =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || die "cannot read the version from '$bin --version'"
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# debian/custos/ is where dpkg-shlibdeps expects the package's files.
mkdir -p "$work/debian"
root=$work/debian/custos
install -d "$root"

# Stripped as Debian strips binaries (dh_strip): the debug information is
# about 3/4 of a release build, and a backtrace of the packaged binary shows
# addresses, not function names (build from source to debug).
install -D -m 0755 "$bin" "$root/usr/bin/custos"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/custos"
for unit in systemd/*.service; do
    install -D -m 0644 "$unit" "$root/usr/lib/systemd/system/$(basename "$unit")"
done

install -D -m 0644 contrib/deb/custos.toml "$root/etc/custos/custos.toml"
install -D -m 0644 policies/defaults.toml "$root/etc/custos/policies/defaults.toml"
install -D -m 0644 contrib/deb/acme.toml.example "$root/etc/custos/policies/acme.toml.example"

install -d "$root/usr/share/man/man1"
"$bin" man --out "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
completion() { # completion SHELL PATH
    install -d "$(dirname "$root/$2")"
    "$bin" completions "$1" > "$root/$2"
    chmod 0644 "$root/$2"
}
completion bash usr/share/bash-completion/completions/custos
completion zsh usr/share/zsh/vendor-completions/_custos
completion fish usr/share/fish/vendor_completions.d/custos.fish

doc=$root/usr/share/doc/custos
docs() { # docs DIR FILES...: into /usr/share/doc/custos/DIR
    local dir=$doc/$1
    shift
    install -d "$dir"
    install -m 0644 -t "$dir" "$@"
}
docs . README.md
docs docs docs/*.md
docs docs/policy-examples docs/policy-examples/*
docs policies policies/*.toml
docs contrib/prometheus contrib/prometheus/*.yml
docs contrib/grafana contrib/grafana/*.json

# copyright: custos itself, then every crate linked into the binary (the
# normal dependencies cargo resolves for this platform, default features),
# each with the license its authors declare.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo metadata --locked --offline --format-version 1 --filter-platform "$host" > "$work/metadata.json"
# The years of the project's commits (first-last), for the notice.
years=$(git log --format=%cd --date=format:%Y 2>/dev/null | sort -u | sed -n '1p;$p' | uniq | paste -sd- -)
python3 - "$work/metadata.json" "$years" > "$doc/copyright" <<'PY'
import json, sys

meta = json.load(open(sys.argv[1]))
pkgs = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]
seen, todo = set(), [root]
while todo:
    for dep in nodes[todo.pop()]["deps"]:
        normal = any(k["kind"] is None for k in dep["dep_kinds"])
        if normal and dep["pkg"] not in seen:
            seen.add(dep["pkg"])
            todo.append(dep["pkg"])
rows = sorted(
    (pkgs[i]["name"] + " " + pkgs[i]["version"], pkgs[i].get("license") or "see the crate's license file")
    for i in seen
)
width = max(len(name) for name, _ in rows)
print("custos " + pkgs[root]["version"])
print()
print(("Copyright " + sys.argv[2] + " " if sys.argv[2] else "Copyright ") + "the custos authors. The project states no license yet")
print("(its Cargo.toml has no `license` field).")
print()
print("/usr/bin/custos statically links these Rust crates (versions from")
print("Cargo.lock), each under the license its authors declare; the license")
print("texts are in each crate's source, common ones in /usr/share/common-licenses/.")
print()
for name, license in rows:
    print("  " + name.ljust(width) + "  " + license)
PY
chmod 0644 "$doc/copyright"
# The changelog Debian wants of a native package: one entry, dated by the
# commit it was built from (the same tree gives the same file).
{
    printf 'custos (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Built by scripts/package-deb.sh from commit %s.\n\n' "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    printf ' -- %s  %s\n' "$maintainer" "$(git log -1 --format=%cD 2>/dev/null || date -R)"
} | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# Control files. Depends: the shared libraries the binary links, by dpkg-shlibdeps.
install -d "$root/DEBIAN"
printf 'Source: custos\n\nPackage: custos\nArchitecture: any\n' > "$work/debian/control"
depends=$(cd "$work" && dpkg-shlibdeps -O -edebian/custos/usr/bin/custos 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $depends ]] || die "dpkg-shlibdeps found no Depends for the binary"
(cd "$root" && find etc -type f | sort | sed 's|^|/|') > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "contrib/deb/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: custos
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Section: admin
Priority: optional
Description: per-tenant encrypted backups under each tenant's own key
 custos is a daemon and command-line tool that backs up each tenant's data
 encrypted under the tenant's own key (local, AWS KMS, PKCS#11 or KMIP),
 rotates keys, restore-tests backups against a recovery-time objective,
 crypto-shreds tenants with signed deletion certificates, and keeps a
 tamper-evident, signed audit log.
 .
 This package holds the binary, the systemd units (custos.service, the
 daemon; custos-drill@.service, an on-demand restore drill), an example
 configuration in /etc/custos, man pages, shell completions, the
 documentation, Prometheus alert rules and a Grafana dashboard.
EOF

mkdir -p "$out"
deb=$out/custos_${version}_${arch}.deb
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >&2
echo "$deb"

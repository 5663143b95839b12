#!/usr/bin/env bash
# Builds the Debian package (scripts/package-deb.sh) and checks it without
# installing it: the machine is not changed. scripts/test.sh runs it after
# the tests, with CUSTOS_PACKAGE_PROFILE=debug.
#
#   scripts/test-package.sh [DEB]      (DEB: check that package instead of building one)
#
# 1. dpkg-deb --info / --contents: the control fields (Package, Version =
#    the binary's, Architecture, Depends on the C library), the conffiles
#    (everything under /etc, nothing else), the maintainer scripts, owners
#    and modes.
# 2. dpkg-deb -x into a temporary root: the file list (binary, units,
#    conffiles, man pages, completions, docs, copyright); the binary runs
#    (`custos --version`) and carries no test hooks; the man pages and
#    completions are well-formed; the example tenant policy validates
#    against the packaged configuration and defaults.
# 3. systemd-analyze verify of the unpacked units, from the unpacked root
#    (--root), so ExecStart=/usr/bin/custos is the packaged binary and not
#    whatever the machine has, and every Documentation= is checked: the
#    file:// paths exist in the package, and `man:` pages are looked up in
#    the package's man pages (MANPATH; systemd-analyze runs `man`). With
#    --root, systemd-analyze also resolves the units' dependencies
#    (sysinit.target, network-online.target, …) and ExecReload=/bin/kill
#    inside that root, so the host's target and slice units and /bin/kill
#    are copied into a second root beside the unpacked package (hard links
#    of it), never into the package's own tree. This needs no running
#    systemd (it works in a container).
#
# CUSTOS_PACKAGE_PROFILE (release by default): passed to package-deb.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "test-package: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1; }
if ! need systemd-analyze; then
    echo "test-package: installing systemd (for systemd-analyze verify)" >&2
    if need apt-get; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd) >&2
    fi
    need systemd-analyze || die "systemd-analyze is required (apt-get install systemd)"
fi
if ! need man; then
    echo "test-package: installing man-db (systemd-analyze checks man: links with man)" >&2
    if need apt-get; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends man-db) >&2
    fi
    need man || die "man is required (apt-get install man-db)"
fi

# Under target/, not /tmp: custos refuses a configuration file below a
# world-writable directory (secure_fs), and the checks below load the
# packaged one from the unpacked root.
mkdir -p target
work=$(mktemp -d "$PWD/target/test-package.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ $# -ge 1 ]]; then
    deb=$1
else
    deb=$(CUSTOS_PACKAGE_COMPRESSION=${CUSTOS_PACKAGE_COMPRESSION:-gzip} scripts/package-deb.sh "$work/out")
fi
[[ -f $deb ]] || die "no package at '$deb'"
failures=0
fail() { echo "test-package: FAIL: $*" >&2; failures=$((failures + 1)); }

# --- 1. Metadata -----------------------------------------------------------
field() { dpkg-deb --field "$deb" "$1"; }
[[ $(field Package) == custos ]] || fail "Package is '$(field Package)'"
[[ $(field Architecture) == "$(dpkg --print-architecture)" ]] || fail "Architecture is '$(field Architecture)'"
[[ $(field Depends) =~ (^|, )libc6\ \(\>=\ [0-9.]+\) ]] || fail "Depends lacks a versioned libc6: '$(field Depends)'"
[[ -n $(field Maintainer) ]] || fail "no Maintainer"
[[ $(field Installed-Size) =~ ^[0-9]+$ ]] || fail "Installed-Size is '$(field Installed-Size)'"
info=$(dpkg-deb --info "$deb")
for script in postinst prerm postrm conffiles md5sums; do
    grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\*? *$script( |$)" <<< "$info" || fail "control archive lacks $script:
$info"
done

mkdir "$work/control"
dpkg-deb --control "$deb" "$work/control"
expected_conffiles='/etc/custos/custos.toml
/etc/custos/policies/acme.toml.example
/etc/custos/policies/defaults.toml'
[[ $(sort "$work/control/conffiles") == "$expected_conffiles" ]] \
    || fail "conffiles are:
$(cat "$work/control/conffiles")
expected:
$expected_conffiles"
for script in postinst prerm postrm; do
    [[ -x $work/control/$script ]] || fail "$script is not executable"
    sh -n "$work/control/$script" || fail "$script is not valid sh"
    # The maintainer scripts create no user (DynamicUser=) and fetch nothing.
    if grep -nE '\b(useradd|adduser|curl|wget|apt-get)\b' "$work/control/$script"; then
        fail "$script creates users or uses the network (above)"
    fi
done

contents=$(dpkg-deb --contents "$deb")
# Every entry root-owned; the binary executable; nothing else (but directories) is.
if awk '$2 != "root/root" { print; bad = 1 } END { exit !bad }' <<< "$contents"; then
    fail "entries not owned by root/root (above)"
fi
grep -qE '^-rwxr-xr-x root/root +[0-9]+ .* \./usr/bin/custos$' <<< "$contents" || fail "/usr/bin/custos is not a 0755 file"
if awk '$1 ~ /^-..x/ && $NF != "./usr/bin/custos" { print; bad = 1 } END { exit !bad }' <<< "$contents"; then
    fail "executable files other than the binary (above)"
fi

# --- 2. The unpacked tree --------------------------------------------------
root=$work/root
dpkg-deb -x "$deb" "$root"
for f in \
    usr/bin/custos \
    usr/lib/systemd/system/custos.service \
    usr/lib/systemd/system/custos-drill@.service \
    etc/custos/custos.toml \
    etc/custos/policies/defaults.toml \
    etc/custos/policies/acme.toml.example \
    usr/share/man/man1/custos.1.gz \
    usr/share/man/man1/custos-daemon.1.gz \
    usr/share/man/man1/custos-drill.1.gz \
    usr/share/man/man1/custos-backup.1.gz \
    usr/share/bash-completion/completions/custos \
    usr/share/zsh/vendor-completions/_custos \
    usr/share/fish/vendor_completions.d/custos.fish \
    usr/share/doc/custos/copyright \
    usr/share/doc/custos/README.md \
    usr/share/doc/custos/docs/daemon.md \
    usr/share/doc/custos/docs/drills.md \
    usr/share/doc/custos/contrib/prometheus/alerts.yml \
    usr/share/doc/custos/contrib/grafana/custos.json; do
    [[ -f $root/$f && -s $root/$f ]] || fail "missing or empty: /$f"
done
# Every unit and doc of the repository is in the package.
for f in systemd/*.service; do
    cmp -s "$f" "$root/usr/lib/systemd/system/$(basename "$f")" || fail "/usr/lib/systemd/system/$(basename "$f") differs from $f"
done
for f in docs/*.md; do
    cmp -s "$f" "$root/usr/share/doc/custos/$f" || fail "/usr/share/doc/custos/$f differs from $f"
done
# Nothing outside the places a package may use.
if (cd "$root" && find . -mindepth 1 -maxdepth 1 | grep -vxE '\./(usr|etc)'); then
    fail "top-level entries other than /usr and /etc (above)"
fi

bin=$root/usr/bin/custos
version=$("$bin" --version) || fail "the unpacked custos --version failed"
[[ $version == "custos $(field Version)" ]] || fail "custos --version says '$version', the package is $(field Version)"
echo "test-package: $version ($(field Depends))" >&2
# The shipped build ignores the test hooks' variables (scripts/check-default-build.sh).
if grep -aoE 'CUSTOS_(FAULTS|KEY_FAULTS|CRASH_AT)|FaultyStore|FaultyKeyProvider' "$bin" | sort -u | grep .; then
    fail "the packaged binary holds test-hook code (above)"
fi

# One man page per subcommand the binary knows, each a well-formed page.
mkdir "$work/man"
"$bin" man --out "$work/man"
[[ $(cd "$work/man" && ls | sed 's/$/.gz/') == "$(ls "$root/usr/share/man/man1")" ]] \
    || fail "the packaged man pages are not the ones the binary generates"
for page in "$root"/usr/share/man/man1/*.gz; do
    gzip -t "$page" || fail "$page is not gzip"
    zcat "$page" | grep -q '^\.TH ' || fail "$page has no .TH header"
done
man -l "$root/usr/share/man/man1/custos.1.gz" 2>/dev/null | grep -q 'custos' || fail "man cannot render custos(1)"

bash -n "$root/usr/share/bash-completion/completions/custos" || fail "the bash completion is not valid bash"
grep -q 'complete .*custos' "$root/usr/share/bash-completion/completions/custos" || fail "the bash completion registers nothing for custos"
head -1 "$root/usr/share/zsh/vendor-completions/_custos" | grep -qx '#compdef custos' || fail "the zsh completion lacks '#compdef custos'"
grep -q '^complete -c custos ' "$root/usr/share/fish/vendor_completions.d/custos.fish" || fail "the fish completion has no 'complete -c custos'"
if need zsh; then zsh -n "$root/usr/share/zsh/vendor-completions/_custos" || fail "the zsh completion is not valid zsh"; fi
if need fish; then fish -n "$root/usr/share/fish/vendor_completions.d/custos.fish" || fail "the fish completion is not valid fish"; fi

# The copyright file names every crate Cargo.lock links into the binary.
grep -q '^  tokio ' "$root/usr/share/doc/custos/copyright" || fail "the copyright file does not list the crates"

# The example tenant, copied as the operator is told to, validates under the
# packaged configuration and defaults.toml.
mkdir "$work/policies"
cp "$root/etc/custos/policies/defaults.toml" "$work/policies/"
cp "$root/etc/custos/policies/acme.toml.example" "$work/policies/acme.toml"
"$bin" --config "$root/etc/custos/custos.toml" policy validate "$work/policies" >&2 \
    || fail "the example policy does not validate (above)"

# --- 3. systemd-analyze verify -------------------------------------------
vroot=$work/verify-root
cp -al "$root" "$vroot"
for host_units in /usr/lib/systemd/system /lib/systemd/system; do
    [[ -d $host_units ]] && find "$host_units" -maxdepth 1 -type f \( -name '*.target' -o -name '*.slice' \) \
        -exec cp -n -t "$vroot/usr/lib/systemd/system" {} +
done
kill_bin=$(type -P kill || true)
[[ -n $kill_bin ]] || die "no kill binary to stand in for ExecReload=/bin/kill"
install -D -m 0755 "$kill_bin" "$vroot/bin/kill"
units=()
for unit in "$root"/usr/lib/systemd/system/*.service; do
    name=$(basename "$unit")
    units+=("${name/@./@verify.}") # a template is verified as an instance
done
if ! out=$(MANPATH=$root/usr/share/man SYSTEMD_LOG_COLOR=0 systemd-analyze verify --root="$vroot" "${units[@]}" 2>&1); then
    fail "systemd-analyze verify failed:
$out"
elif [[ -n $out ]]; then
    # verify exits 0 on some warnings (an unknown key); none is acceptable.
    fail "systemd-analyze verify warned:
$out"
fi
# Documentation= names what the package installs, never a web address.
for unit in "$root"/usr/lib/systemd/system/*.service; do
    docs=$(sed -n 's/^Documentation=//p' "$unit")
    [[ -n $docs ]] || fail "$(basename "$unit") has no Documentation="
    for uri in $docs; do
        case $uri in
        man:*) ;; # checked by verify above, against the package's pages
        file://*) [[ -f $root/${uri#file://} ]] || fail "$(basename "$unit"): $uri is not in the package" ;;
        *) fail "$(basename "$unit"): Documentation=$uri is neither man: nor a packaged file" ;;
        esac
    done
done

if ((failures)); then
    die "$failures check(s) failed for $deb"
fi
echo "test-package: $deb passes ($(dpkg-deb --contents "$deb" | grep -c -v '/$') files)" >&2

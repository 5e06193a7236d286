#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (amd64 on CI, the host's architecture in general),
# installs it with dpkg, checks what it installed, lints it, and purges it again.
#
#   bash .ci/package.sh
#
# Root only (dpkg -i). Installs what is missing: cargo-deb (cargo install --locked), and with
# apt-get systemd (systemd-analyze; also the package's systemd-sysusers dependency), lintian and
# dpkg-dev (dpkg-shlibdeps, which cargo-deb needs to compute the libc6 dependency).
# It refuses to run if a sensorgate package is already installed, because it purges the package
# at the end (and on failure): it leaves no package, config, unit mask or (if it created it)
# sensorgate user behind. Environment:
#   SENSORGATE_MAX_EXPOSURE   highest accepted `systemd-analyze security` exposure (default 2.0)
#   CARGO_DEB_VERSION         cargo-deb to install when it is missing or older (default 3.8.0)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

max_exposure=${SENSORGATE_MAX_EXPOSURE:-2.0}
cargo_deb_version=${CARGO_DEB_VERSION:-3.8.0}
conf=/etc/sensorgate/sensorgate.toml
unit=/lib/systemd/system/sensorgate.service

script_start=$(date +%s)
step_start=$script_start
timings=()
step() {
    local now
    now=$(date +%s)
    echo
    echo "== $* (+$((now - script_start))s)"
}
# Record how long the step since the last call took, under the given name.
took() {
    local now
    now=$(date +%s)
    timings+=("$(printf '%-26s %4ss' "$1" "$((now - step_start))")")
    step_start=$now
}
fail() {
    echo "package.sh: FAILED: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges a package with dpkg)"
command -v dpkg >/dev/null 2>&1 || fail "dpkg not found: this script is for Debian and derivatives"
if dpkg-query -W -f='${Status}' sensorgate 2>/dev/null | grep -qv 'not-installed'; then
    fail "a sensorgate package is already installed here and this script purges it at the end" \
        "(config included); remove it first with 'dpkg -P sensorgate'"
fi

# --- Tools ------------------------------------------------------------------------------------
step "tools"
apt_missing=()
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
command -v lintian >/dev/null 2>&1 || apt_missing+=(lintian)
command -v dpkg-shlibdeps >/dev/null 2>&1 || apt_missing+=(dpkg-dev)
# cargo install needs a C compiler (cargo-deb's xz bindings build C code); rustc links with cc.
command -v cc >/dev/null 2>&1 || apt_missing+=(gcc libc6-dev)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    echo "installing with apt-get: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
took "apt-get (${#apt_missing[@]} missing)"

installed_cargo_deb=
if cargo deb --version >/dev/null 2>&1; then
    installed_cargo_deb=$(cargo deb --version | awk '{print $2}')
fi
# 3.8.0 is the first version tested with this packaging (sysusers + systemd-units snippets).
if [ -z "$installed_cargo_deb" ] || dpkg --compare-versions "$installed_cargo_deb" lt 3.8.0; then
    echo "installing cargo-deb $cargo_deb_version (found: ${installed_cargo_deb:-none})"
    cargo install cargo-deb --locked --version "$cargo_deb_version"
    took "cargo install cargo-deb"
else
    echo "cargo-deb $installed_cargo_deb already installed"
    took "cargo-deb (present)"
fi

# --- Build ------------------------------------------------------------------------------------
step "cargo deb (release build + package)"
# cargo-deb prints the path of the .deb on stdout; build output goes to stderr.
deb=$(cargo deb --locked | tail -n 1)
[ -f "$deb" ] || fail "cargo deb did not produce a .deb (got: '$deb')"
took "cargo deb"
echo "built $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"

depends=$(dpkg-deb --field "$deb" Depends)
# $auto must resolve to libc6 alone; the rest is from Cargo.toml: procps (/bin/kill for the
# unit's ExecReload) and the systemd-sysusers dependency. cargo-deb sorts them.
if ! [[ "$depends" =~ ^libc6(:[a-z0-9]+)?\ \(\>=\ [0-9.]+\),\ procps,\ systemd\ \|\ systemd-sysusers$ ]]; then
    fail "unexpected Depends: $depends"
fi
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx "$conf" \
    || fail "$conf is not a conffile"

# --- Install and check ------------------------------------------------------------------------
user_existed=no
getent passwd sensorgate >/dev/null && user_existed=yes
group_existed=no
getent group sensorgate >/dev/null && group_existed=yes

cleanup() {
    local rc=$?
    if dpkg-query -W -f='${Status}' sensorgate 2>/dev/null | grep -qv 'not-installed'; then
        echo "cleanup: purging the sensorgate package"
        dpkg --purge sensorgate >/dev/null || rc=1
    fi
    # The package keeps its system user on purge (Debian practice); CI removes it if it made it.
    if [ "$user_existed" = no ] && getent passwd sensorgate >/dev/null; then
        userdel sensorgate || rc=1
    fi
    if [ "$group_existed" = no ] && getent group sensorgate >/dev/null; then
        groupdel sensorgate || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT

step "dpkg -i"
dpkg -i "$deb"
took "install"

step "checks"
check_out=$(/usr/bin/sensorgate check --config "$conf") || fail "sensorgate check exited $?"
echo "$check_out"
grep -q ': ok' <<<"$check_out" || fail "sensorgate check did not print ok"
# The service reads the config as the sensorgate user: the group permission must work.
runuser -u sensorgate -- /usr/bin/sensorgate check --config "$conf" >/dev/null \
    || fail "sensorgate check as user sensorgate failed (config not readable by the service?)"

id sensorgate
id -nG sensorgate | tr ' ' '\n' | grep -qx dialout || fail "user sensorgate is not in group dialout"
conf_stat=$(stat -c '%a %U:%G' "$conf")
echo "$conf: $conf_stat"
[ "$conf_stat" = "640 root:sensorgate" ] || fail "$conf is $conf_stat, expected 640 root:sensorgate"
systemctl is-enabled sensorgate.service >/dev/null 2>&1 && fail "sensorgate.service got enabled on install"

verify_out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $verify_out"
if grep -qi sensorgate <<<"$verify_out"; then
    fail "systemd-analyze verify reports problems: $verify_out"
fi
[ -z "$verify_out" ] || echo "systemd-analyze verify (not about sensorgate): $verify_out"
echo "systemd-analyze verify $unit: clean"

security_out=$(systemd-analyze security --offline=yes "$unit" 2>&1) \
    || fail "systemd-analyze security failed: $security_out"
grep -E '^✗' <<<"$security_out" || true
exposure=$(sed -n 's/.*Overall exposure level for sensorgate\.service: \([0-9][0-9.]*\).*/\1/p' <<<"$security_out")
[ -n "$exposure" ] || fail "no 'Overall exposure level' line in systemd-analyze security output"
echo "exposure: $exposure (at most $max_exposure accepted)"
awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e + 0 <= m + 0) }' \
    || fail "exposure $exposure is above $max_exposure: harden systemd/sensorgate.service"
took "checks"

# --- Lintian ----------------------------------------------------------------------------------
step "lintian"
lintian_out=$(lintian --fail-on none --display-info "$deb" 2>&1) || fail "lintian failed: $lintian_out"
lintian_out=$(grep -v 'running with root privileges' <<<"$lintian_out" || true)
echo "${lintian_out:-(no tags)}"
# shellcheck disable=SC2016 # the backquotes are literal: list items start with - `tag`.
explained=$(sed -nE 's/^- `([a-z0-9.+-]+)`.*/\1/p' debian/LINTIAN.md | sort -u)
errors=$(grep -c '^E:' <<<"$lintian_out" || true)
unexplained=()
while read -r tag; do
    [ -n "$tag" ] || continue
    grep -qx "$tag" <<<"$explained" || unexplained+=("$tag")
done < <(awk '$1 == "W:" { print $3 }' <<<"$lintian_out" | sort -u)
[ "$errors" = 0 ] || fail "lintian reports $errors error(s)"
[ "${#unexplained[@]}" = 0 ] \
    || fail "lintian warning(s) not explained in debian/LINTIAN.md: ${unexplained[*]}"
warnings=$(grep -c '^W:' <<<"$lintian_out" || true)
infos=$(grep -c '^I:' <<<"$lintian_out" || true)
took "lintian"

# --- Remove -----------------------------------------------------------------------------------
step "dpkg -r, dpkg -P"
dpkg -r sensorgate
[ ! -e /usr/bin/sensorgate ] || fail "/usr/bin/sensorgate left after dpkg -r"
[ -f "$conf" ] || fail "$conf (a conffile) should survive dpkg -r"
dpkg -P sensorgate
[ ! -e /etc/sensorgate ] || fail "/etc/sensorgate left after dpkg -P"
if [ -e "$unit" ] || [ -L /etc/systemd/system/sensorgate.service ]; then
    fail "unit file or mask left after purge"
fi
took "remove + purge"

deb_size=$(stat -c %s "$deb")
installed_size=$(dpkg-deb --field "$deb" Installed-Size)
total=$(($(date +%s) - script_start))

echo
echo "== summary"
echo "package:        $(basename "$deb") ($deb_size bytes, $(numfmt --to=iec-i --suffix=B "$deb_size"); installed $installed_size KiB)"
echo "depends:        $depends"
echo "sensorgate check: ok (as root and as user sensorgate); user in dialout; config 640 root:sensorgate"
echo "systemd-analyze: verify clean, exposure $exposure (max $max_exposure)"
echo "lintian:        0 errors, $warnings warning(s) (all in debian/LINTIAN.md), $infos info"
echo "removed and purged: ok"
printf '  %s\n' "${timings[@]}"
echo "total: ${total}s"

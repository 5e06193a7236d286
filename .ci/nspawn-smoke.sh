#!/usr/bin/env bash
# The Debian package under a real systemd: a bookworm root filesystem (debootstrap, Debian's
# packages) booted with systemd-nspawn (systemd 252 as PID 1, private network), the built .deb
# installed offline, then: enable --now, readings reach mosquitto, the watchdog is fed, a reload
# applies a change, a bad config is refused on reload (the service runs on), `systemctl stop`
# publishes `offline`, /run is read-only for the service, and its journal shows nothing denied.
# Root only; .ci/run runs it on the package .ci/package.sh built. ~2 min the first time (the
# root filesystem), ~20 s after.
#
#   bash .ci/nspawn-smoke.sh path/to/sensorgate_*.deb
#
# Environment: SG_ROOTFS (default /var/tmp/sensorgate-nspawn-rootfs, kept for the next run).
set -euo pipefail
deb=$(realpath "$1")
rootfs=${SG_ROOTFS:-/var/tmp/sensorgate-nspawn-rootfs}
export DEBIAN_FRONTEND=noninteractive

need() { command -v "$1" >/dev/null 2>&1 || apt-get install -y -qq "$2" >/dev/null; }
need systemd-nspawn systemd-container
need debootstrap debootstrap

if [ ! -x "$rootfs/usr/bin/mosquitto_sub" ]; then
    echo "== debootstrap bookworm into $rootfs"
    rm -rf "$rootfs"
    if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,mosquitto,mosquitto-clients \
        bookworm "$rootfs" http://deb.debian.org/debian >/dev/null; then
        # Debian's mirror out of reach is not the package's fault: say so loudly, do not fail.
        echo "nspawn smoke: SKIPPED: debootstrap could not build the root filesystem" >&2
        exit 0
    fi
fi
# A run that stopped half-way may have left the package installed and enabled: start clean.
rm -rf "$rootfs/etc/systemd/system/sensorgate.service.d"
cp "$deb" "$rootfs/root/sensorgate.deb"
cat >"$rootfs/root/sensorgate.toml" <<'EOF'
[gateway]
id = "nspawn"
metrics_interval = "2s"
[mqtt]
host = "127.0.0.1"
[[device]]
name = "sim"
path = "/run/sim/port"
framing = "lines"
EOF

mkdir -p /run/systemd
log=$(mktemp)
systemd-nspawn -D "$rootfs" --boot --private-network --register=no --keep-unit -q >"$log" 2>&1 &
nspawn=$!
cleanup() {
    kill "$nspawn" 2>/dev/null || true
    wait "$nspawn" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

# The container's PID 1, once it is there.
leader=""
for _ in $(seq 1 100); do
    leader=$(pgrep -P "$nspawn" -x systemd || true)
    [ -n "$leader" ] && break
    sleep 0.1
done
[ -n "$leader" ] || { echo "the container did not boot"; cat "$log"; exit 1; }
inside() { nsenter -t "$leader" -m -u -i -n -p -- "$@"; }
inside systemctl is-system-running --wait >/dev/null 2>&1 || true
echo "== booted: $(inside systemctl --version | head -1)"

# A kept root filesystem may hold an earlier install with an edited conffile: start clean
# (dpkg would stop at its conffile prompt).
inside sh -c 'dpkg --purge sensorgate >/dev/null 2>&1; dpkg -i /root/sensorgate.deb >/dev/null && cp /root/sensorgate.toml /etc/sensorgate/sensorgate.toml'
inside systemctl enable --now mosquitto >/dev/null 2>&1
# The simulated sensor runs as the service's user, so that the pseudo-terminal is its to open.
inside sh -c 'mkdir -p /run/sim && chown sensorgate /run/sim'
inside systemd-run --unit=sim --uid=sensorgate /usr/bin/sensorgate simulate --link /run/sim/port --rate 5 >/dev/null 2>&1
inside systemctl enable --now sensorgate >/dev/null 2>&1
started=$(date +%s.%N)

check() { echo "ok: $*"; }
failed() { echo "FAILED: $*"; inside journalctl -u sensorgate --no-pager | tail -30; exit 1; }

inside timeout 20 mosquitto_sub -h 127.0.0.1 -t 'sensorgate/nspawn/devices/sim/readings' -C 3 >/dev/null \
    || failed "no readings"
check "readings reach mosquitto ($(awk "BEGIN{print $(date +%s.%N) - $started}") s after enable)"
[ "$(inside systemctl show -p ActiveState --value sensorgate)" = active ] || failed "not active"
inside systemctl show -p WatchdogTimestampMonotonic --value sensorgate | grep -qv '^0$' || failed "watchdog not fed"
check "active, watchdog fed"
# In the service's own mount namespace, /run (and /run/lock) must be read-only (ReadOnlyPaths=).
pid=$(inside systemctl show -p MainPID --value sensorgate)
if inside nsenter -t "$pid" -m -- touch /run/lock/sensorgate-probe 2>/dev/null; then
    failed "/run/lock is writable in the service's namespace"
fi
check "/run is read-only for the service"

# Reload: a change is applied; a bad file is refused and the service runs on.
inside sed -i 's/metrics_interval = "2s"/metrics_interval = "3s"/' /etc/sensorgate/sensorgate.toml
# Waits up to 10 s for the service's journal to say $1 (since this run's start).
says() {
    for _ in $(seq 1 50); do
        inside journalctl -u sensorgate --no-pager --since "@${started%.*}" | grep -q "$1" && return 0
        sleep 0.2
    done
    return 1
}
inside systemctl reload sensorgate || failed "reload (ExecReload) failed"
says "Configuration reloaded." || failed "the reload was not applied"
check "systemctl reload applies a change"
inside sh -c 'echo "[gateway" >> /etc/sensorgate/sensorgate.toml'
inside systemctl reload sensorgate || true
says "Reload refused" || failed "the bad config was not refused"
[ "$(inside systemctl show -p ActiveState --value sensorgate)" = active ] || failed "a bad config on reload stopped the service"
check "a bad config on reload is refused; still active"

# Stop: the gateway says offline (retained) before it exits.
inside systemctl stop sensorgate
inside timeout 5 mosquitto_sub -h 127.0.0.1 -t 'sensorgate/nspawn/state' -C 1 | grep -qx offline || failed "no offline after stop"
check "systemctl stop publishes offline"
denied=$(inside journalctl -u sensorgate --no-pager --since "@${started%.*}" | grep -ci "denied\|operation not permitted" || true)
[ "$denied" = 0 ] || failed "the service's journal says denied / not permitted $denied time(s)"
check "nothing denied in the service's journal"
echo "nspawn smoke: PASSED"

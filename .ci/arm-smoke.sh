#!/usr/bin/env bash
# ARM smoke test: the aarch64 release binary, run under qemu-user, carries readings from a
# simulated sensor on a pseudo-terminal to a real mosquitto on 127.0.0.1, then shuts down
# cleanly:
#
#   host sensorgate simulate ─pty─► qemu-aarch64 sensorgate run ─► mosquitto ─► mosquitto_sub
#
#   .ci/arm-smoke.sh                # aarch64 glibc build (cross/build.sh aarch64)
#   .ci/arm-smoke.sh aarch64-musl   # the static build, run without the target's glibc
#
# As root on Debian 12 with the Rust toolchain; safe to re-run. Installs qemu-user, mosquitto,
# mosquitto-clients, jq and file if missing; builds the ARM binary with cross/build.sh (which
# installs the cross gcc and the Rust target) and the host debug binary (the simulator).
# Exits non-zero, with the logs, on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
began=$SECONDS

COUNT=100 # readings the simulator sends and the subscriber must receive
RATE=50   # per second
GW_ID=armsmoke
DEVICE=sensor
variant=${1:-aarch64}
case "$variant" in
    aarch64) triple=aarch64-unknown-linux-gnu ;;
    aarch64-musl) triple=aarch64-unknown-linux-musl ;;
    *)
        echo "usage: $0 [aarch64|aarch64-musl]" >&2
        exit 2
        ;;
esac

log() { echo "arm-smoke: $*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

# --- tools --------------------------------------------------------------------------------
missing=()
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v file >/dev/null 2>&1 || missing+=(file)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: run as root, or install them first"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# --- binaries -----------------------------------------------------------------------------
cross/build.sh "$variant"
cargo build --locked --bin sensorgate # the host simulator; a no-op when up to date
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
arm_bin=$target_dir/$triple/release/sensorgate
host_bin=$target_dir/debug/sensorgate
if [ "$variant" = aarch64-musl ]; then
    # No -L: a static binary must not need the target's C library.
    file -b "$arm_bin" | grep -q 'statically linked' || fail "$arm_bin is not statically linked: $(file -b "$arm_bin")"
    qemu=(qemu-aarch64)
else
    # The target's glibc and loader, from libc6-arm64-cross (installed by cross/build.sh).
    qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
fi
built=$SECONDS
version=$("${qemu[@]}" "$arm_bin" --version) || fail "the ARM binary does not start under ${qemu[*]}"
log "$version ($triple) runs under ${qemu[*]}"

# --- processes, cleaned up however we exit ---------------------------------------------------
tmp=$(mktemp -d)
pids=()
ok=0
cleanup() {
    local i
    # Newest first: the gateway before the broker it reports to.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    local pid
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$ok" != 1 ]; then
        for f in mosquitto.log sim.log gw.log sub.log; do
            [ -s "$tmp/$f" ] && { echo "---- $f (last 40 lines) ----"; tail -n 40 "$tmp/$f"; } >&2
        done
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls `cmd...` every 0.1 s for up to $1 seconds.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { kill -0 "$1" 2>/dev/null; }
exited() { ! alive "$1"; }

# mosquitto on a free port (another process may take the port between the check and the
# bind: then try another).
for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    listening "$port" && continue
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n' "$port" \
        >"$tmp/mosquitto.conf"
    "$mosquitto" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
    mosq_pid=$!
    pids+=("$mosq_pid")
    wait_until 10 listening "$port" && alive "$mosq_pid" && break
    kill "$mosq_pid" 2>/dev/null || true
    mosq_pid=
done
[ -n "${mosq_pid:-}" ] || fail "mosquitto did not start"
log "mosquitto on 127.0.0.1:$port"

readings_topic="sensorgate/$GW_ID/devices/$DEVICE/readings"
sub=(mosquitto_sub -h 127.0.0.1 -p "$port")
# A persistent QoS 1 session registered before the gateway starts: the broker keeps every
# reading for it, however late the subscriber below gets going. No sleeps, no races.
"${sub[@]}" -i arm-smoke-sub -c -q 1 -E -t 'sensorgate/+/devices/+/readings'
"${sub[@]}" -i arm-smoke-sub -c -q 1 -C "$COUNT" -W 60 -t 'sensorgate/+/devices/+/readings' \
    >"$tmp/readings" 2>"$tmp/sub.log" &
sub_pid=$!
pids+=("$sub_pid")

# The simulated sensor: the host binary creates the pseudo-terminal and links it.
"$host_bin" simulate --link "$tmp/sensor" --rate "$RATE" --count "$COUNT" >"$tmp/sim.log" 2>&1 &
sim_pid=$!
pids+=("$sim_pid")
wait_until 10 test -L "$tmp/sensor" || fail "the simulator did not create $tmp/sensor"

cat >"$tmp/gw.toml" <<EOF
[gateway]
id = "$GW_ID"
[mqtt]
host = "127.0.0.1"
port = $port
[[device]]
name = "$DEVICE"
path = "$tmp/sensor"
framing = "lines"
format = "json"
EOF
RUST_LOG=info NO_COLOR=1 "${qemu[@]}" "$arm_bin" run --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")
log "gateway (aarch64 under qemu) pid $gw_pid; waiting for $COUNT readings"

# --- checks -------------------------------------------------------------------------------
sub_status=0
wait "$sub_pid" || sub_status=$?
received=$(wc -l <"$tmp/readings")
if [ "$sub_status" != 0 ] || [ "$received" != "$COUNT" ]; then
    fail "received $received of $COUNT readings on $readings_topic (mosquitto_sub exit $sub_status)"
fi
head -n 1 "$tmp/readings" | jq -e --arg dev "$DEVICE" '.n == 0 and ._gw.device == $dev and ._gw.seq == 1' >/dev/null ||
    fail "the first reading is not what was sent: $(head -n 1 "$tmp/readings")"
# Every reading exactly once: the gateway's sequence numbers 1..COUNT and the sensor's 0..COUNT-1.
jq -se --argjson n "$COUNT" '([.[]._gw.seq] | sort) == [range(1; $n + 1)] and ([.[].n] | sort) == [range(0; $n)]' \
    "$tmp/readings" >/dev/null || fail "readings missing or duplicated"
log "received all $COUNT readings; first: $(head -n 1 "$tmp/readings")"
if grep -q "opened with classic termios" "$tmp/gw.log"; then
    log "serial port opened through the classic termios fallback (this qemu lacks TCGETS2/TCSETS2)"
fi

alive "$gw_pid" || fail "the gateway exited early"
kill -TERM "$gw_pid"
wait_until 60 exited "$gw_pid" || fail "the gateway did not exit within 60 s of SIGTERM"
gw_status=0
wait "$gw_pid" || gw_status=$?
[ "$gw_status" = 0 ] || fail "the gateway exited with status $gw_status after SIGTERM"
grep -q "Final accounting" "$tmp/gw.log" || fail "no final accounting in the gateway log"

state=$("${sub[@]}" -C 1 -W 5 -t "sensorgate/$GW_ID/state")
[ "$state" = offline ] || fail "retained gateway state is '$state', not offline"
dev_state=$("${sub[@]}" -C 1 -W 5 -t "sensorgate/$GW_ID/devices/$DEVICE/state" | jq -r .state)
[ "$dev_state" = stopped ] || fail "retained device state is '$dev_state', not stopped"
log "SIGTERM: exit 0, gateway state offline, device state stopped (both retained)"

# --- report -------------------------------------------------------------------------------
# The release profile strips (Cargo.toml: strip = true); `file` confirms it when installed.
size() {
    local bytes stripped=""
    bytes=$(stat -c %s "$1")
    if command -v file >/dev/null 2>&1; then
        stripped=", $(file -b "$1" | grep -o 'not stripped\|stripped' || echo 'strip state unknown')"
    fi
    echo "$bytes bytes ($(numfmt --to=iec-i --suffix=B "$bytes"))$stripped"
}
log "$triple release binary: $(size "$arm_bin")"
if [ -x "$target_dir/release/sensorgate" ]; then
    log "x86_64-unknown-linux-gnu release binary: $(size "$target_dir/release/sensorgate"), built $(date -r "$target_dir/release/sensorgate" '+%F %T')"
fi
if [ "$variant" = aarch64 ] && command -v aarch64-linux-gnu-objdump >/dev/null 2>&1; then
    floor=$(aarch64-linux-gnu-objdump -T "$arm_bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
    log "aarch64 binary needs glibc >= ${floor#GLIBC_}"
fi
ok=1
log "PASSED in $((SECONDS - began)) s (builds $((built - began)) s, smoke test $((SECONDS - built)) s)"

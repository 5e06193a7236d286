#!/usr/bin/env bash
# README's test command. The end-to-end tests start a real mosquitto on 127.0.0.1; if it is
# missing and we may install packages, install it first. The interoperability tests
# (tests/interop.rs) also need amqtt (PyPI) and aedes (npm), and the Modbus tests against a
# slave we did not write (tests/modbus_pymodbus.rs) pymodbus with pyserial (PyPI), and the Sparkplug
# tests (tests/sparkplug.rs) the decoder pysparkplug (PyPI): installed below into
# $SG_INTEROP_DIR (default ~/.cache/sensorgate/interop, outside the checkout so that a fresh
# clone, as in CI, does not install them again), once; later runs only check the versions.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || ! command -v mosquitto_pub >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "mosquitto or mosquitto_pub not found: installing them from Debian's packages" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        echo "mosquitto or mosquitto_pub not found: installing them with sudo apt-get" >&2
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    else
        echo "mosquitto not found and cannot be installed here; install it (e.g. apt-get install mosquitto mosquitto-clients) and retry" >&2
        exit 1
    fi
fi

# Versions the interop tests were written against; bump on purpose.
AMQTT_VERSION=0.12.1
AEDES_VERSION=1.2.0
PYMODBUS_VERSION=3.16.1
PYSERIAL_VERSION=3.5
PYSPARKPLUG_VERSION=0.6.1
export SG_INTEROP_DIR="${SG_INTEROP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorgate/interop}"
mkdir -p "$SG_INTEROP_DIR"

# A venv under $SG_INTEROP_DIR with exactly these PyPI packages, made again when a version differs.
pip_venv() {
    local venv="$SG_INTEROP_DIR/$1" want="" names="" spec
    shift
    for spec in "$@"; do
        want="$want ${spec#*==}"
        names="$names, m.version(\"${spec%%==*}\")"
    done
    local have
    have=" $("$venv/bin/python" -c "import importlib.metadata as m; print(*[${names#, }])" 2>/dev/null || true)"
    if [ "$have" != "$want" ]; then
        echo "installing $* (PyPI) into $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
    fi
}

pip_venv amqtt-venv "amqtt==$AMQTT_VERSION"
pip_venv pymodbus-venv "pymodbus==$PYMODBUS_VERSION" "pyserial==$PYSERIAL_VERSION"
pip_venv sparkplug-venv "pysparkplug==$PYSPARKPLUG_VERSION"

# Home Assistant's own MQTT discovery schemas (tests/homeassistant.rs): Home Assistant 2026.11
# needs Python >= 3.14, which only Debian's newer suites carry, so it lives in a Debian sid
# chroot (debootstrap; root only), built once (~2 min). Without it the test says so and skips.
HOMEASSISTANT_VERSION=2026.11.0
ha_root="$SG_INTEROP_DIR/ha-root"
ha_ok() {
    chroot "$ha_root" /ha/bin/python -c \
        "import sys, homeassistant.const as c; sys.exit(c.__version__ != '$HOMEASSISTANT_VERSION')" 2>/dev/null
}
if [ "$(id -u)" = 0 ] && ! ha_ok; then
    if command -v debootstrap >/dev/null 2>&1 || apt-get install -y -qq debootstrap >/dev/null 2>&1; then
        echo "building a Debian sid chroot with Home Assistant $HOMEASSISTANT_VERSION in $ha_root" >&2
        rm -rf "$ha_root"
        if debootstrap --variant=minbase --include=python3.14,python3.14-venv,ca-certificates sid "$ha_root" \
            http://deb.debian.org/debian >/dev/null 2>&1; then
            # The host's CA bundle: PyPI may be reached through this network's proxy.
            cp /etc/ssl/certs/ca-certificates.crt "$ha_root/etc/ssl/certs/ca-certificates.crt"
            cp /etc/resolv.conf "$ha_root/etc/resolv.conf" 2>/dev/null || true
            chroot "$ha_root" sh -c "unset PIP_FIND_LINKS; python3.14 -m venv /ha && /ha/bin/pip install --quiet --disable-pip-version-check \
                --cert /etc/ssl/certs/ca-certificates.crt homeassistant==$HOMEASSISTANT_VERSION paho-mqtt==2.1.0" \
                || { echo "WARNING: could not install Home Assistant in $ha_root; tests/homeassistant.rs will skip" >&2; rm -rf "$ha_root"; }
        else
            echo "WARNING: debootstrap of Debian sid failed; tests/homeassistant.rs will skip" >&2
            rm -rf "$ha_root"
        fi
    fi
fi

aedes="$SG_INTEROP_DIR/aedes"
if [ "$(node -p "require('$aedes/node_modules/aedes/package.json').version" 2>/dev/null)" != "$AEDES_VERSION" ]; then
    command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js and npm (apt-get install nodejs npm) and retry" >&2; exit 1; }
    echo "installing aedes $AEDES_VERSION (npm) into $aedes" >&2
    mkdir -p "$aedes"
    npm install --prefix "$aedes" --no-save --no-audit --no-fund --loglevel=error "aedes@$AEDES_VERSION" >/dev/null
fi

exec cargo test --workspace "$@"

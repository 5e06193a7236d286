#!/usr/bin/env bash
# README's test command. The end-to-end tests start a real mosquitto on 127.0.0.1; if it is
# missing and we may install packages, install it first.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "mosquitto not found: installing it from Debian's packages" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        echo "mosquitto not found: installing it with sudo apt-get" >&2
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "mosquitto not found and cannot be installed here; install it (e.g. apt-get install mosquitto) and retry" >&2
        exit 1
    fi
fi

exec cargo test --workspace "$@"

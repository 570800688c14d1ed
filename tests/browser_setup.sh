#!/usr/bin/env bash
# Install Debian's headless browser for the page test: chromium + chromium-driver, as root.
# Never downloads a browser any other way. Exits non-zero with the reason when it cannot.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium is not installed and installing it needs root (apt-get)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "chromium is not installed and this machine has no apt-get" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium chromium-driver

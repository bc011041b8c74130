#!/usr/bin/env bash
# Install the headless browser the status page's end-to-end test drives: Debian's chromium.
#
# Playwright's own browser download (`playwright install`) cannot work on our machines (only
# package registries are reachable), so the test drives the distribution's chromium instead.
# Idempotent: does nothing when /usr/bin/chromium is there. Needs root (or sudo) and apt-get.
#
# Usage: bash scripts/install-browser.sh
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  echo "install-browser: $CHROMIUM is installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown')); nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: $CHROMIUM is missing and apt-get is not available;" \
    "install Chromium with your system's package manager" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-browser: need root (or sudo) to install chromium with apt-get" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-browser: $CHROMIUM is missing; running apt-get update"
$SUDO apt-get update -q
echo "install-browser: installing chromium (apt-get install -y --no-install-recommends chromium)"
$SUDO apt-get install -y -q --no-install-recommends chromium
echo "install-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"

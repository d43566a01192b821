#!/usr/bin/env bash
# Installs the system packages the tests need (Chromium for the review-UI browser tests).
# Needs root and apt; without them it prints what to install and the browser tests skip
# locally (under CI=true they fail instead: nothing may be skipped there).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the browser tests..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  exit 0
fi
echo "chromium is missing: install the 'chromium' package (as root: apt-get install -y chromium)" >&2
if [ "${CI:-}" = "true" ]; then
  exit 1
fi

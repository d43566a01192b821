#!/usr/bin/env bash
# Installs the system packages the tests need: Chromium (review-UI browser tests) and
# Debian's redis-server (the compose smoke test runs the compose file's Redis with AOF).
# Needs root and apt; without them it prints what to install and those tests skip locally
# (under CI=true they fail instead: nothing may be skipped there).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (Debian packages) for the tests..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # the package's own service is not wanted: tests start redis-server themselves
  if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
  exit 0
fi
echo "missing: ${missing[*]} (as root: apt-get install -y ${missing[*]})" >&2
if [ "${CI:-}" = "true" ]; then
  exit 1
fi

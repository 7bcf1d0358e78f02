#!/usr/bin/env bash
# The dashboard's browser tests drive the system Chromium through Playwright (which never
# downloads a browser here). Installs Debian's `chromium` when it is missing and we may (root or
# sudo); otherwise says so, and those tests skip with that reason. Never fails the build.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "chromium not installed and no root: the browser tests will skip" >&2; exit 0; fi
fi
echo "chromium not found: installing Debian's package (for the dashboard's browser tests)" >&2
$SUDO apt-get update -qq >/dev/null 2>&1
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
  || echo "installing chromium failed: the browser tests will skip" >&2
exit 0

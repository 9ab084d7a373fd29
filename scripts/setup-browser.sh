#!/usr/bin/env bash
# Installs the headless browser of tokenbroker-axum's browser tests: Debian's `chromium` and
# `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver). Idempotent: installs only what
# is missing, and runs `apt-get update` only when an install fails without it (the package lists
# may be absent or stale). Prints the versions found on stdout.
#
# Never fails the caller: when the browser cannot be installed it says why on stderr and exits
# 0, and the browser tests then print SKIPPED instead of running.
set -uo pipefail
log() { printf 'browser: %s\n' "$*" >&2; }

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
[ -x "$CHROMEDRIVER" ] || missing+=(chromium-driver)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "cannot install ${missing[*]}: need root for apt-get (the browser tests will be SKIPPED)"
    exit 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "cannot install ${missing[*]}: no apt-get on this machine (the browser tests will be SKIPPED)"
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  install() {
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1
  }
  apt_log=$(mktemp)
  trap 'rm -f "$apt_log"' EXIT
  log "installing ${missing[*]}"
  if ! install; then
    log "install failed; retrying after apt-get update"
    if ! apt-get update -qq >"$apt_log" 2>&1 || ! install; then
      log "cannot install ${missing[*]} (the browser tests will be SKIPPED); apt-get said:"
      tail -n 20 "$apt_log" >&2
      exit 0
    fi
  fi
fi

# Both must run, not just exist: a missing shared library shows up here, not in the test.
# (Debian's launcher script complains on stderr when findmnt lists /dev/shm twice, as in some
# containers; harmless, so its stderr is shown only when the browser does not run.)
if ! chromium_version=$("$CHROMIUM" --version 2>"${TMPDIR:-/tmp}/setup-browser.$$.err"); then
  log "$CHROMIUM does not run (the browser tests will be SKIPPED): $(cat "${TMPDIR:-/tmp}/setup-browser.$$.err")"
  rm -f "${TMPDIR:-/tmp}/setup-browser.$$.err"
  exit 0
fi
rm -f "${TMPDIR:-/tmp}/setup-browser.$$.err"
if ! driver_version=$("$CHROMEDRIVER" --version 2>&1); then
  log "$CHROMEDRIVER does not run (the browser tests will be SKIPPED): $driver_version"
  exit 0
fi
echo "$chromium_version"
echo "$driver_version"

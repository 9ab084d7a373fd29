#!/usr/bin/env bash
# The whole test suite, set-up included, on a fresh machine:
#   - Node packages for the real OpenID Provider (oidc-provider, from tests/idp/package-lock.json)
#   - a throwaway PostgreSQL cluster (Debian's postgresql package, installed when missing)
#   - a throwaway Redis server (Debian's redis-server package, installed when missing)
#   - headless Chromium and ChromeDriver for the adapter's browser test (Debian's chromium and
#     chromium-driver, installed when missing; without them that test prints SKIPPED)
# then every test of every workspace member (tokenbroker, tokenbroker-axum) with every feature,
# doc tests included (the fault matrix and a 60 s soak among them), then a short run of every
# libFuzzer target (scripts/fuzz.sh).
#
# Usage: scripts/test.sh [extra cargo test arguments]
# Set TOKENBROKER_TEST_POSTGRES_URL / TOKENBROKER_TEST_REDIS_URL to use existing servers instead
# of starting them,
# TOKENBROKER_SOAK_SECONDS to soak longer, FUZZ_SECONDS to fuzz longer (0: not at all).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*" >&2; }

say "real IdP: Node packages"
bash scripts/setup-idp.sh

say "browser: chromium and chromedriver"
bash scripts/setup-browser.sh
# Installed: then a browser test that cannot start is a failure, not a skip.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  export TOKENBROKER_REQUIRE_BROWSER=1
fi

if [ -z "${TOKENBROKER_TEST_POSTGRES_URL:-}" ]; then
  say "PostgreSQL: throwaway cluster"
  eval "$(bash scripts/setup-postgres.sh)"
  trap 'bash scripts/stop-postgres.sh >&2 || true' EXIT
fi
export TOKENBROKER_TEST_POSTGRES_URL

if [ -z "${TOKENBROKER_TEST_REDIS_URL:-}" ]; then
  say "Redis: throwaway server"
  eval "$(bash scripts/setup-redis.sh)"
  trap 'bash scripts/stop-postgres.sh >&2 || true; bash scripts/stop-redis.sh >&2 || true' EXIT
fi
export TOKENBROKER_TEST_REDIS_URL

say "cargo test --workspace --all-features"
cargo test --workspace --all-features "$@"

say "fuzz targets, ${FUZZ_SECONDS:=20}s each (FUZZ_SECONDS=0 skips)"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  FUZZ_SECONDS="$FUZZ_SECONDS" bash scripts/fuzz.sh
fi

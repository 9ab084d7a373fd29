#!/usr/bin/env bash
# The whole test suite, set-up included, on a fresh machine:
#   - Node packages for the real OpenID Provider (oidc-provider, from tests/idp/package-lock.json)
#   - a throwaway PostgreSQL cluster (Debian's postgresql package, installed when missing)
# then every test of every feature, doc tests included.
#
# Usage: scripts/test.sh [extra cargo test arguments]
# Set TOKENBROKER_TEST_POSTGRES_URL to use an existing server instead of starting one.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*" >&2; }

say "real IdP: Node packages"
bash scripts/setup-idp.sh

if [ -z "${TOKENBROKER_TEST_POSTGRES_URL:-}" ]; then
  say "PostgreSQL: throwaway cluster"
  eval "$(bash scripts/setup-postgres.sh)"
  trap 'bash scripts/stop-postgres.sh >&2 || true' EXIT
fi
export TOKENBROKER_TEST_POSTGRES_URL

say "cargo test --all-features"
cargo test --all-features "$@"

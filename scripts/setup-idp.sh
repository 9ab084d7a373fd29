#!/usr/bin/env bash
# Installs the Node packages of the real OpenID Provider used by the integration tests
# (tests/idp, pinned by its package-lock.json). Idempotent: does nothing when node_modules is
# newer than the lockfile.
set -euo pipefail
cd "$(dirname "$0")/../tests/idp"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "error: the real-IdP tests need Node.js (>= 20.19) and npm; install them (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "error: Node.js $(node --version) is too old for oidc-provider 9; need >= 20.19" >&2
  exit 1
fi
if [ -d node_modules/oidc-provider ] && [ node_modules -nt package-lock.json ]; then
  echo "real IdP: node packages up to date" >&2
  exit 0
fi
echo "real IdP: npm ci" >&2
npm ci --no-audit --no-fund --loglevel=error >&2
touch node_modules

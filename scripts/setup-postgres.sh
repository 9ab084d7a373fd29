#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests and prints, on stdout, the line
#   export TOKENBROKER_TEST_POSTGRES_URL=postgres://...
# (diagnostics go to stderr). Use it as:  eval "$(scripts/setup-postgres.sh)"
# Stop it with scripts/stop-postgres.sh.
#
# Installs Debian's `postgresql` package when no server binaries are found. initdb refuses to
# run as root, so the cluster belongs to an unprivileged user (`postgres` when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'postgres: %s\n' "$*" >&2; }

find_bin() {
  local dir
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return 0
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

if ! bin=$(find_bin); then
  log "server binaries not found: installing Debian's postgresql package"
  if [ "$(id -u)" -ne 0 ]; then
    log "error: need root to apt-get install postgresql (or set TOKENBROKER_TEST_POSTGRES_URL)"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  bin=$(find_bin) || { log "error: postgresql installed but initdb not found"; exit 1; }
fi

# Outside the checkout: the cluster owner must be able to reach it, wherever the clone is.
state_dir="${TMPDIR:-/tmp}/tokenbroker-test-postgres-$(printf %s "$PWD" | md5sum | cut -c1-8)"
mkdir -p "$state_dir"
data="$state_dir/data"
run_as=()
owner=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
  owner=postgres
  if ! id "$owner" >/dev/null 2>&1; then
    useradd --system --home-dir "$state_dir" --shell /usr/sbin/nologin "$owner" >&2
  fi
  run_as=(runuser -u "$owner" --)
  chown -R "$owner" "$state_dir"
fi

if [ -f "$data/postmaster.pid" ]; then
  "${run_as[@]}" "$bin/pg_ctl" -D "$data" -m immediate stop >&2 2>&1 || true
fi
rm -rf "$data"
"${run_as[@]}" "$bin/initdb" -D "$data" -U tokenbroker --auth=trust --no-sync -E UTF8 >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
"${run_as[@]}" "$bin/pg_ctl" -D "$data" -l "$state_dir/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >&2
echo "$bin" > "$state_dir/bin"
"${run_as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U tokenbroker tokenbroker_test >&2
log "ready on 127.0.0.1:$port"
echo "export TOKENBROKER_TEST_POSTGRES_URL=postgres://tokenbroker@127.0.0.1:$port/tokenbroker_test"

#!/usr/bin/env bash
# Starts a throwaway Redis server for the tests and prints, on stdout, the line
#   export TOKENBROKER_TEST_REDIS_URL=redis://127.0.0.1:PORT
# (diagnostics go to stderr). Use it as:  eval "$(scripts/setup-redis.sh)"
# Stop it with scripts/stop-redis.sh.
#
# Installs Debian's `redis-server` package when the server is not found. The server listens on
# a random free loopback port, keeps its files in a throwaway directory, and persists nothing
# (--save '' --appendonly no): the tests make their own data.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'redis: %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  log "redis-server not found: installing Debian's redis-server package"
  if [ "$(id -u)" -ne 0 ]; then
    log "error: need root to apt-get install redis-server (or set TOKENBROKER_TEST_REDIS_URL)"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends redis-server >&2
  command -v redis-server >/dev/null 2>&1 || { log "error: redis-server installed but not found"; exit 1; }
fi

# Outside the checkout, one per checkout (as setup-postgres.sh does).
state_dir="${TMPDIR:-/tmp}/tokenbroker-test-redis-$(printf %s "$PWD" | md5sum | cut -c1-8)"
mkdir -p "$state_dir"
if [ -f "$state_dir/redis.pid" ]; then
  kill "$(cat "$state_dir/redis.pid")" 2>/dev/null || true
  rm -f "$state_dir/redis.pid"
fi
rm -rf "$state_dir/data"
mkdir -p "$state_dir/data"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
redis-server --bind 127.0.0.1 --port "$port" --dir "$state_dir/data" \
  --save '' --appendonly no --maxmemory-policy noeviction \
  --daemonize yes --pidfile "$state_dir/redis.pid" --logfile "$state_dir/server.log" >&2
for _ in $(seq 1 100); do
  if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
    log "ready on 127.0.0.1:$port"
    echo "export TOKENBROKER_TEST_REDIS_URL=redis://127.0.0.1:$port"
    exit 0
  fi
  sleep 0.1
done
log "error: server did not answer on 127.0.0.1:$port; see $state_dir/server.log"
exit 1

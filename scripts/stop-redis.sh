#!/usr/bin/env bash
# Stops the throwaway server started by scripts/setup-redis.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
state_dir="${TMPDIR:-/tmp}/tokenbroker-test-redis-$(printf %s "$PWD" | md5sum | cut -c1-8)"
[ -f "$state_dir/redis.pid" ] || exit 0
pid=$(cat "$state_dir/redis.pid")
kill "$pid" 2>/dev/null || true
for _ in $(seq 1 50); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
rm -rf "$state_dir"

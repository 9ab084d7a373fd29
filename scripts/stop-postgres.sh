#!/usr/bin/env bash
# Stops the throwaway cluster started by scripts/setup-postgres.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# Outside the checkout: the cluster owner must be able to reach it, wherever the clone is.
state_dir="${TMPDIR:-/tmp}/tokenbroker-test-postgres-$(printf %s "$PWD" | md5sum | cut -c1-8)"
[ -f "$state_dir/data/postmaster.pid" ] || exit 0
bin=$(cat "$state_dir/bin")
if [ "$(id -u)" -eq 0 ]; then
  runuser -u postgres -- "$bin/pg_ctl" -D "$state_dir/data" -m fast stop >&2
else
  "$bin/pg_ctl" -D "$state_dir/data" -m fast stop >&2
fi

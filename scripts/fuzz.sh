#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS seconds each (default 30),
# starting from the committed seeds in fuzz/corpus/<target>/. Installs cargo-fuzz when missing.
# Only stable Rust is needed: RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags libFuzzer needs.
#
# Usage: scripts/fuzz.sh [target ...]     (all targets when none is named)
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# Build once, then run each target on a scratch copy of its seeds (libFuzzer adds what it
# finds to the corpus directory; the committed seeds stay as they are).
cargo fuzz build -a
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  mkdir -p "$scratch/$t"
  cp -a "fuzz/corpus/$t/." "$scratch/$t/" 2>/dev/null || true
  status=0
  cargo fuzz run -a "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || status=$?
  grep -E 'DONE|stat::number_of_executed_units|stat::new_units_added' "$scratch/$t.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz: $t found a crash (see fuzz/artifacts/$t/)" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash"

#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/fuzz_targets for FUZZ_SECONDS seconds each (default 30),
# starting from the committed seeds in fuzz/corpus/<target>/.
#
# Only stable Rust exists here, so the targets are built the way `cargo fuzz build` builds them
# (same flags: SanitizerCoverage, AddressSanitizer, --cfg fuzzing, debug assertions), with
# RUSTC_BOOTSTRAP=1 for the sanitizer flag, but without installing cargo-fuzz: that install
# alone takes minutes a CI run cannot spare. With cargo-fuzz installed, `cargo fuzz run <target>`
# works on the same crate.
#
# Usage: scripts/fuzz.sh [target ...]     (all targets when none is named)
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script; reproduce it with
#   fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"

triple=$(rustc -vV | sed -n 's/^host: //p')
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed -n 's/\.rs$//p' | sort)
fi

# The flags of cargo-fuzz 0.13 (src/project.rs) for `build -a` with the default sanitizer.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Zsanitizer=address \
-Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=1" \
  cargo build --manifest-path fuzz/Cargo.toml --target "$triple" --release \
    --config 'profile.release.debug="line-tables-only"' --bins
bin_dir="fuzz/target/$triple/release"

# Each target runs on a scratch copy of its seeds (libFuzzer adds what it finds to the first
# corpus directory; the committed seeds stay as they are).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  status=0
  "$bin_dir/$t" "$scratch/$t" "fuzz/corpus/$t" \
    -artifact_prefix="fuzz/artifacts/$t/" \
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

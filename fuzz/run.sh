#!/bin/sh
# Runs one fuzz target on stable Rust for a bounded time, starting from its committed seeds.
# Usage (from the repository root): fuzz/run.sh <target> [seconds, default 30]
set -eu
target="$1"
seconds="${2:-30}"
mkdir -p "fuzz/corpus/$target"
# cargo-fuzz passes -Zsanitizer and friends, which stable rustc accepts only with this.
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds"

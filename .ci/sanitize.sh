#!/usr/bin/env bash
# Builds the native core with ASan + UBSan (DENDRITE_SANITIZE=ON) in a temp
# directory and runs the native C++ tests (ctest: test_native, which includes
# a randomized fuzz run with invariant and simulated-KV checks). Any sanitizer
# report aborts the run (halt_on_error=1, -fno-sanitize-recover=all), so a
# zero exit status means: tests passed and no ASan/UBSan/LeakSanitizer report.
#
# The tests run outside Python on purpose: ASan inside the interpreter would
# need LD_PRELOAD of libasan and leak suppressions for CPython itself.
#
# Usage: .ci/sanitize.sh [fuzz_ops_per_seed]   (default 20000, 5 seeds)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(mktemp -d "${TMPDIR:-/tmp}/dendrite-sanitize.XXXXXX")"
trap 'rm -rf "$build"' EXIT
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

cmake -S "$here" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDENDRITE_SANITIZE=ON \
  -DDENDRITE_BUILD_PYTHON=OFF \
  -DDENDRITE_BUILD_TESTS=ON
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 2)"

export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
"$build/test_native" "${1:-20000}"
(cd "$build" && ctest --output-on-failure)
echo "sanitize: OK (ASan+UBSan, no reports)"

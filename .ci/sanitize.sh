#!/usr/bin/env bash
# Builds the native core with ASan + UBSan (DENDRITE_SANITIZE=ON) in a temp
# directory and runs the native C++ tests (ctest: test_native, which includes
# a randomized fuzz run with invariant and simulated-KV checks). Any sanitizer
# report aborts the run (halt_on_error=1, -fno-sanitize-recover=all), so a
# zero exit status means: tests passed and no ASan/UBSan/LeakSanitizer report.
#
# The native tests run outside Python on purpose: ASan inside the interpreter
# needs LD_PRELOAD of the runtimes and leak detection off (CPython's own
# allocations look leaked). With DENDRITE_SANITIZE_PYTHON=1 the script also
# builds a sanitized dendrite._native and runs tests/native under it that way
# (slower: a few minutes on 2 cores).
#
# Usage: [DENDRITE_SANITIZE_PYTHON=1] .ci/sanitize.sh [fuzz_ops_per_seed]
#        (default 20000 ops for each of 5 seeds)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(mktemp -d "${TMPDIR:-/tmp}/dendrite-sanitize.XXXXXX")"
trap 'rm -rf "$build"' EXIT
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

cmake -S "$here" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDENDRITE_SANITIZE=ON \
  -DDENDRITE_BUILD_PYTHON="$([ "${DENDRITE_SANITIZE_PYTHON:-0}" = 1 ] && echo ON || echo OFF)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir 2>/dev/null || true)" \
  -DPython_EXECUTABLE="$(command -v python)" \
  -DDENDRITE_BUILD_TESTS=ON
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 2)"

export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
"$build/test_native" "${1:-20000}"
(cd "$build" && ctest --output-on-failure)

if [ "${DENDRITE_SANITIZE_PYTHON:-0}" = 1 ]; then
  # A throwaway package dir: the sanitized module next to the Python layer.
  mkdir -p "$build/pkg"
  cp -r "$here/dendrite" "$build/pkg/"
  rm -f "$build"/pkg/dendrite/_native*.so
  cp "$build"/_native*.so "$build/pkg/dendrite/"
  # `pytest` (not `python -m pytest`) so ./dendrite does not shadow $pkg.
  (cd "$here" && \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
    ASAN_OPTIONS="halt_on_error=1:detect_leaks=0" PYTHONPATH="$build/pkg" \
    pytest -q -p no:cacheprovider tests/native)
fi
echo "sanitize: OK (ASan+UBSan, no reports)"

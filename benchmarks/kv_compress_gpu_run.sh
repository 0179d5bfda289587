#!/usr/bin/env bash
# Issue 17 part 3 (N-bit KV pages) on one GPU: the kernel tests, then the kernel timings.
# Usage, from the repository root:  OUT=/path bash benchmarks/kv_compress_gpu_run.sh
# Writes into $OUT: tests.txt (pytest of the int4/int3 GPU tests and the CPU ones),
# kv_compress.json / kv_compress.md (bytes per token, kernel timings; accuracy rows
# too when the default model has real weights there), run.log. About 3 minutes on an H100.
set -uo pipefail
OUT=${OUT:-/tmp/kv-compress-out}
mkdir -p "$OUT"
LOG=$OUT/run.log
: >"$LOG"
nvidia-smi -L >>"$LOG" 2>&1
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PWD:${PYTHONPATH:-} ;; esac
# `import dendrite` loads the native core: build it when this checkout has none (~20 s).
if ! python3 -c "import dendrite" 2>/dev/null; then
  { cmake -S . -B /tmp/native-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDENDRITE_BUILD_TESTS=OFF -DPython_EXECUTABLE="$(command -v python3)" \
      -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
    cmake --build /tmp/native-build -j 16 &&
    cp /tmp/native-build/_native*.so dendrite/; } >>"$LOG" 2>&1
fi
timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_kv_quant_attention_gpu.py tests/kernels/test_kv_quant_attention_interpreted.py \
    tests/model/test_kv_quant.py tests/attention/test_quant_kv_attention.py \
    tests/engine/test_engine_kv_int4.py >"$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
timeout 240 python3 benchmarks/bench_kv_compress.py --device cuda --sections bytes,kernels,accuracy \
    --tokens 1024 --out "$OUT/kv_compress.json" >>"$LOG" 2>&1
cat "$OUT/kv_compress.md" 2>/dev/null || tail -20 "$LOG"

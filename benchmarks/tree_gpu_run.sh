#!/usr/bin/env bash
# One device run of benchmarks/bench_tree_gpu.py, from the repository root, with
# the FlashInfer wheels carried in .whl/:
#
#   bash benchmarks/tree_gpu_run.sh
#
# 1. installs the carried wheels into /tmp/site;
# 2. starts FlashInfer's JIT builds (fa3 + fa2 prefill, cascade merge, decode)
#    in the background: FlashInfer's file locks make the benchmark wait for a
#    module still being built;
# 3. installs dendrite (`pip install --no-build-isolation --no-deps .`, which
#    builds the native module with scikit-build-core); if that fails, builds
#    the module in place with plain CMake and runs from the checkout;
# 4. runs the benchmark from /tmp (so the source tree, which has no native
#    module for this Python, does not shadow the installed package), inside
#    what is left of TREE_RUN_BUDGET seconds;
# 5. if time is left, the cascade tests (the CUDA ones run here).
# $OUT gets: run.log, build.log, tree_bench.md, tree_bench.json, tree_bench.png.
set -u
REPO=$PWD
OUT=${OUT:-$REPO/tree_out}
BUDGET=${TREE_RUN_BUDGET:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run.log
: >"$LOG"
say() { echo "[$(date +%T) t=${SECONDS}s] $*" | tee -a "$LOG"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; tail -20 "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site
say "wheels installed"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, flashinfer, transformers; print('torch', torch.__version__, '| flashinfer', flashinfer.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

B=$REPO/benchmarks/bench_tree_gpu.py
for k in fa3 fa2 decode; do
  (cd /tmp && python3 "$B" --warmup $k >/tmp/tree-warmup-$k.log 2>&1) &
done

RUNDIR=/tmp
if (cd "$REPO" && PYTHONPATH=/tmp/site:$REPO python3 -c "import dendrite._native") 2>/dev/null; then
  say "native module already built in the checkout; running from it"
  export PYTHONPATH=/tmp/site:$REPO
  RUNDIR=$REPO
elif python3 -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
  say "dendrite installed with pip"
else
  say "pip install failed (tail below); building the native module in place with cmake"
  tail -n 25 "$OUT/build.log" | tee -a "$LOG"
  { cmake -S . -B /tmp/native-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDENDRITE_BUILD_TESTS=OFF -DPython_EXECUTABLE="$(command -v python3)" \
      -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
    cmake --build /tmp/native-build -j 16 &&
    cp /tmp/native-build/_native*.so dendrite/; } >>"$OUT/build.log" 2>&1
  export PYTHONPATH=/tmp/site:$REPO
  RUNDIR=$REPO
fi
(cd $RUNDIR && python3 -c "import dendrite, dendrite.kv; print('dendrite at', dendrite.__file__)") 2>&1 | tee -a "$LOG"

LEFT=$((BUDGET - SECONDS))
say "benchmark: ${LEFT}s left"
export TREE_BENCH_COMMAND="bash benchmarks/tree_gpu_run.sh (python3 benchmarks/bench_tree_gpu.py --out \$OUT)"
# TREE_BENCH_ARGS: extra benchmark arguments, e.g. "--skip tot,decode,kv,mcts", or
# "--skip fork,decode,kv,mcts,grammar,cascade" for the ToT row alone (dendrite.search.tot_bfs,
# the hand-written engine loop, HF).
(cd $RUNDIR && timeout -k 10 $((LEFT - 5)) python3 "$B" --out "$OUT" --budget-s $((LEFT - 45)) \
   ${TREE_BENCH_ARGS:-}) 2>&1 | tee -a "$LOG"
say "benchmark rc=${PIPESTATUS[0]}"
for k in fa3 fa2 decode; do echo "-- warmup $k:"; tail -n 3 /tmp/tree-warmup-$k.log; done >>"$LOG" 2>&1

if [ $((BUDGET - SECONDS)) -gt 35 ]; then
  (cd /tmp && timeout 30 python3 -m pytest "$REPO/tests/engine/test_cascade_rule.py" \
     "$REPO/tests/engine/test_eager_cascade.py" -q -p no:cacheprovider \
     -o addopts="" 2>&1 | tail -n 6) | tee -a "$LOG"
fi
say "end"

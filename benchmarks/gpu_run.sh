#!/usr/bin/env bash
# The one command a GPU device run executes, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit
#   bash benchmarks/gpu_run.sh
#
# Stages, each its own process under `timeout` (a stage that hangs costs only
# itself) and all inside one wall-clock budget (GPU_RUN_BUDGET seconds):
# FlashInfer JIT warm-up (background), model build, the Dendrite benchmark
# and its torch.compile variant, HF transformers, the GPU tests, then the HF
# static-cache and max-autotune variants. The table comes last. Files under $OUT (at most a
# handful, since the device tool brings back 8): run.log (every stage's log),
# bench.md (the table), bench.json (all stage results), gpu_tests.jsonl,
# pytest.xml.
set -u
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${GPU_RUN_BUDGET:-560}
WORK=${GPU_RUN_WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export DENDRITE_REPORT_DIR=$WORK
: >"$WORK/gpu_tests.jsonl"
LOG=$OUT/run.log
: >"$LOG"

if ! python3 -c "import flashinfer" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} ||
    echo "WARNING: could not install the carried wheels; FlashInfer stages will fail" | tee -a "$LOG"
fi
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PWD:${PYTHONPATH:-} ;; esac

B="python3 benchmarks/bench_gpu_model.py --out $WORK"

# FlashInfer JIT (decode ~15 s, prefill ~90 s on an H100) overlaps the native
# build and the weight build.
$B warmup --kind prefill >"$WORK/warmup-prefill.log" 2>&1 &
WP=$!
$B warmup --kind decode >"$WORK/warmup-decode.log" 2>&1 &
WD=$!

# `import dendrite` loads the native core (dendrite/__init__ -> dendrite.kv); build it
# in place when this checkout has no module for this Python (plain CMake, ~20 s).
if ! python3 -c "import dendrite" 2>/dev/null; then
  echo "== building dendrite._native" | tee -a "$LOG"
  { cmake -S . -B /tmp/native-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDENDRITE_BUILD_TESTS=OFF -DPython_EXECUTABLE="$(command -v python3)" \
      -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
    cmake --build /tmp/native-build -j 16 &&
    cp /tmp/native-build/_native*.so dendrite/; } >>"$LOG" 2>&1
  python3 -c "import dendrite" 2>&1 | tail -n 2 | tee -a "$LOG"
fi

# stage NAME MIN_SECONDS MAX_SECONDS CMD...: run CMD if MIN_SECONDS remain, for at most MAX.
stage() {
  local name=$1 need=$2 cap=$3
  shift 3
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: skipped, ${left}s left" | tee -a "$LOG"
    return 0
  fi
  [ "$left" -gt "$cap" ] && left=$cap
  echo "== $name (limit ${left}s, t=${SECONDS}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=15 "$left" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  grep -v "Loading weights" "$WORK/$name.log" | tail -n 4
}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, flashinfer, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), '| flashinfer', flashinfer.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
  nvcc --version | tail -n 2
} 2>&1 | tee -a "$LOG"


stage build 60 150 $B build
stage dendrite 90 300 $B dendrite
for p in $WP $WD; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
cat "$WORK"/warmup-*.log >>"$LOG"
stage dendrite-compile 60 180 $B dendrite-compile
stage hf 40 150 $B hf
stage tests 60 240 python3 -m pytest -m gpu tests -q -rA -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml" -o junit_family=xunit1
stage hf-static 60 180 $B hf-static
stage dendrite-autotune 120 240 $B dendrite-autotune

$B report >"$WORK/report.log" 2>&1
cp "$WORK/bench.md" "$OUT/bench.md" 2>/dev/null
cp "$WORK/gpu_tests.jsonl" "$OUT/gpu_tests.jsonl" 2>/dev/null
python3 - "$WORK" "$OUT/bench.json" <<'EOF'
import json, pathlib, sys
work, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
merged = {p.stem.removeprefix("bench_"): json.loads(p.read_text()) for p in sorted(work.glob("bench_*.json"))}
pathlib.Path(dst).write_text(json.dumps(merged, indent=2))
EOF
echo "== GPU tests (one line each)" | tee -a "$LOG"
cat "$WORK/gpu_tests.jsonl" | tee -a "$LOG"
grep -E "passed|failed|error" "$WORK/tests.log" | tail -n 3
echo
cat "$WORK/bench.md"

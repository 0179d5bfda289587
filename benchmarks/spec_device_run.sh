#!/usr/bin/env bash
# Issue 18 (speculative decoding) in one device call, from the repository root:
#
#   bash benchmarks/spec_device_run.sh --model DIR      # real weights, e.g. SmolLM2-135M-Instruct
#   bash benchmarks/spec_device_run.sh --model tiny --device cpu --quick   # CPU smoke test
#
# Installs nothing. Writes to $OUT (default ./out18):
#   gpu_tests.txt   tests/speculative/test_spec_gpu.py (fp32 exactness on CUDA; bf16
#                   FlashInfer + CUDA graphs: verify steps replay graphs)
#   spec.json/.md   benchmarks/bench_speculative.py: the rule table (verify vs plain
#                   step, B = 1..32), n-gram on a copy task (1 and 16 branches),
#                   self-draft acceptance, and a controlled-acceptance pair: the
#                   draft = --model, the target = the draft + 7x its layers appended
#                   (output projections noise 0 and 1 x std: acceptance ~100% and low)
#   run.log         everything printed
# Under 5 minutes on an H100: each stage has a timeout and the benchmark a
# wall-clock budget (rows past it are skipped and marked so).
set -u
MODEL=default
DEVICE=
QUICK=
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift 2 ;;
    --device) DEVICE="--device $2"; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    *) echo "spec_device_run.sh: unknown argument $1 (--model DIR, --device D, --quick)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/out18}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD ;; esac
{
  echo "== environment"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, dendrite; print('torch', torch.__version__, '| dendrite from', dendrite.__file__)"
  echo "== GPU tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/speculative/test_spec_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.txt"
  echo "== bench_speculative.py"
  # shellcheck disable=SC2086
  timeout 300 python3 benchmarks/bench_speculative.py --model "$MODEL" $DEVICE $QUICK \
    --out "$OUT/spec.json" --budget 220 --max-tokens 128 --noise 0,1
  echo "== exit $?"
} 2>&1 | tee "$OUT/run.log"

#!/usr/bin/env bash
# Issue 18 (speculative decoding) in one device call, from the repository root:
#
#   bash benchmarks/spec_device_run.sh --model DIR      # real weights, e.g. SmolLM2-135M-Instruct
#   bash benchmarks/spec_device_run.sh --model tiny --device cpu --quick   # CPU smoke test
#
# Installs nothing. Writes to $OUT (default ./out18):
#   gpu_tests.txt   tests/speculative/test_spec_gpu.py (fp32 exactness on CUDA; bf16
#                   FlashInfer + CUDA graphs: verify steps replay graphs)
#   spec_controlled.json/.md  benchmarks/bench_speculative.py --parts controlled:
#                   the draft = --model, the target = the draft + 7x its layers
#                   appended (output projections noise 0 and 0.5 x std: acceptance
#                   ~100% for greedy, and lower), 1 and 16 branches; at noise 0
#                   also n-gram k=8 on the copy task
#   spec_wide.json/.md  the same with the target widened (--target wide: hidden and
#                   heads x4, 28672 MLP neurons; 13 GB of bf16 for SmolLM2-135M)
#   spec.json/.md   the rule table (verify vs plain step, B = 1..32), n-gram on a
#                   copy task (1 and 16 branches), self-draft acceptance (greedy;
#                   sampled, proposed vs drawn drafts)
#   run.log         everything printed
# Under 12 minutes on an H100: each stage has a timeout (60 + 150 + 200 + 300 s) and
# each benchmark a wall-clock budget (rows that would start past it are
# skipped and marked so; every row is saved as it is measured). On a fresh
# machine FlashInfer compiles its kernels on first use (~90 s for prefill):
# warm them first (`python3 benchmarks/bench_gpu_model.py --out /tmp/wu warmup
# --kind prefill`), or the first stage spends its limit compiling.
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
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/speculative/test_spec_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.txt"
  echo "== bench_speculative.py: rule table, n-gram, self-draft"
  # shellcheck disable=SC2086
  timeout 150 python3 benchmarks/bench_speculative.py --model "$MODEL" $DEVICE $QUICK \
    --out "$OUT/spec.json" --parts rule,ngram,self --budget 110 --max-tokens 128
  # The controlled pair last (the JIT kernels are compiled by then): the
  # speedup of a cheap draft for an expensive target at known acceptance
  # (noise 0: 100% for greedy; 0.5: lower).
  echo "== bench_speculative.py: controlled pair"
  # shellcheck disable=SC2086
  timeout 200 python3 benchmarks/bench_speculative.py --model "$MODEL" $DEVICE $QUICK \
    --out "$OUT/spec_controlled.json" --parts controlled --noise 0,0.5 --budget 150 \
    --max-tokens 128 --reps 1
  # The same pair with the target widened instead of deepened (13 GB of bf16
  # weights for SmolLM2-135M: a step bound by its bytes, as an 8B model's is).
  echo "== bench_speculative.py: controlled pair, wide target"
  # shellcheck disable=SC2086
  timeout 300 python3 benchmarks/bench_speculative.py --model "$MODEL" $DEVICE $QUICK \
    --out "$OUT/spec_wide.json" --parts controlled --target wide --noise 0,0.5 --budget 240 \
    --max-tokens 128 --reps 1
  echo "== exit $?"
} 2>&1 | tee "$OUT/run.log"

#!/usr/bin/env bash
# Issue 17 part 1 (FP8 KV pages) on the device, from the repository root, into $OUT:
#
#   bash benchmarks/fp8_kv_gpu_run.sh                 # GPU tests + the tiny-model smoke run
#   bash benchmarks/fp8_kv_gpu_run.sh --model DIR     # also perplexity / top-1 on DIR
#                                                     # (SmolLM2-135M-Instruct, real weights)
#
# Installs nothing (torch, triton, flashinfer, transformers as the device has them).
#   pytest.txt        the FP8 GPU tests and the GPU tests of every file the FP8 work touched
#                     (fused rows, tree attention, CUDA graphs, FlashInfer backend, lookahead)
#   gpu_tests.jsonl   the numbers those tests report (errors vs the reference, agreement)
#   quant.json/.md    bench_quant.py bf16 vs fp8kv (only with --model; 4096 tokens, no GSM8K)
#   run.log           everything
# Stages run under `timeout` (FP8_TESTS_S default 240 s, FP8_ACC_S default 150 s).
set -u
MODEL=
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift 2 ;;
    *) echo "fp8_kv_gpu_run.sh: unknown argument $1 (--model DIR)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/out17fp8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DENDRITE_REPORT_DIR=$OUT
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD ;; esac
LOG=$OUT/run.log
{
  echo "== environment"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)"
  git log --oneline -1 2>/dev/null
  echo "== GPU tests"
  timeout "${FP8_TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/attention/test_fp8_kv_gpu.py tests/kernels/test_rows.py \
    tests/kernels/test_tree_attention_gpu.py tests/model/test_cuda_graph.py \
    tests/attention/test_flashinfer_backend.py tests/engine/test_engine_lookahead_gpu.py \
    tests/model/test_fp8_kv.py 2>&1 | tee "$OUT/pytest.txt"
  echo "pytest exit ${PIPESTATUS[0]}"
  if [ -n "$MODEL" ]; then
    echo "== accuracy: bf16 vs fp8kv on $MODEL"
    timeout "${FP8_ACC_S:-150}" python3 benchmarks/bench_quant.py --model "$MODEL" \
      --configs bf16,fp8kv --tokens 4096 --gsm8k 0 --out "$OUT/quant.json"
    echo "bench_quant exit $?"
  fi
} 2>&1 | tee "$LOG"

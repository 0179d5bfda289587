#!/usr/bin/env bash
# Issue 17's quantization measurements in one device call, from the repository root:
#
#   bash benchmarks/device_run_quant.sh --model DIR     # DIR: SmolLM2-135M-Instruct (real weights)
#   bash benchmarks/device_run_quant.sh --model tiny --device cpu --quick   # CPU smoke test
#
# Installs nothing. Writes to $OUT (default ./out17):
#   quant.json / quant.md   bench_quant.py on --model: perplexity over 16K GSM8K tokens
#                           (windows of 1024), top-1 agreement with bf16 (by margin),
#                           greedy GSM8K on 100 questions, KV capacity in 8 GiB;
#                           configs bf16, fp32, fp8kv, fp8w, fp8kv+fp8w, int4kv, mxfp8w,
#                           fp8w+head (the output projection in FP8 too)
#   speed.json / speed.md   bench_quant_speed.py: Llama-3.2-1B shape, random bf16 weights;
#                           single-stream ms/token and 1 vs 16 branches over a 32K prefix;
#                           configs bf16, fp8kv, fp8w, fp8kv+fp8w, fp8kv+fp8w+head
#   speed8b.json / .md      the same on the Llama-3.1-8B shape (not with --quick):
#                           bf16, fp8w, fp8kv+fp8w+head
#   run.log                 the scripts' output
# Each stage runs under `timeout` (QUANT_ACC_S, default 200 s; QUANT_SPEED_S, default 200 s;
# QUANT_SPEED8B_S, default 330 s); the scripts save their JSON after every configuration, so
# a cut stage keeps its rows. A fresh machine compiles FlashInfer's kernels on first use
# (~90 s): the first stage pays it.
set -u
MODEL=default
DEVICE=
QUICK=
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift 2 ;;
    --device) DEVICE="--device $2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "device_run_quant.sh: unknown argument $1 (--model DIR, --device D, --quick)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/out17}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run.log
: >"$LOG"
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD ;; esac
{
  echo "== environment"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, dendrite; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| dendrite from', dendrite.__file__)"
  git log --oneline -1 2>/dev/null
} 2>&1 | tee -a "$LOG"

if [ -n "$QUICK" ]; then
  ACC_ARGS="--tokens 128 --window 64 --gsm8k 2 --gsm8k-max-tokens 8"
  SPEED_ARGS="--quick"
else
  ACC_ARGS="--tokens 16384 --window 1024 --gsm8k 100 --gsm8k-max-tokens 256"
  SPEED_ARGS=""
fi
ACC_CONFIGS=${QUANT_ACC_CONFIGS:-bf16,fp32,fp8kv,fp8w,fp8kv+fp8w,int4kv,mxfp8w,fp8w+head}
SPEED_CONFIGS=${QUANT_SPEED_CONFIGS:-bf16,fp8kv,fp8w,fp8kv+fp8w,fp8kv+fp8w+head}

stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, t=${SECONDS}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
}
# shellcheck disable=SC2086
stage accuracy "${QUANT_ACC_S:-200}" python3 benchmarks/bench_quant.py --model "$MODEL" $DEVICE \
  $ACC_ARGS --configs "$ACC_CONFIGS" --out "$OUT/quant.json"
# shellcheck disable=SC2086
stage speed "${QUANT_SPEED_S:-200}" python3 benchmarks/bench_quant_speed.py $DEVICE $SPEED_ARGS \
  --configs "$SPEED_CONFIGS" --out "$OUT/speed.json"
if [ -z "$QUICK" ]; then
  # shellcheck disable=SC2086
  stage speed8b "${QUANT_SPEED8B_S:-330}" python3 benchmarks/bench_quant_speed.py $DEVICE \
    --shape 8b --configs bf16,fp8w,fp8kv+fp8w+head --out "$OUT/speed8b.json"
fi
echo
for f in quant speed speed8b; do
  [ -f "$OUT/$f.md" ] && cat "$OUT/$f.md" && echo
done
echo "== done in ${SECONDS}s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"

#!/usr/bin/env bash
# Issue 16's benchmarks in one device call, from the repository root:
#
#   bash benchmarks/device_run_16.sh --model DIR        # real weights, e.g. SmolLM2-135M-Instruct
#   bash benchmarks/device_run_16.sh --model tiny --device cpu --quick   # CPU smoke test
#
# Installs nothing (install the wheels first). Runs, each under `timeout` and
# inside one wall-clock budget (DEVICE_RUN_BUDGET seconds, default 470, i.e.
# under 8 minutes with start-up), then writes everything to $OUT:
#   tot.json / tot.md     bench_tot_gsm8k.py: SGLang ToT v0 + deep, Dendrite at
#                         1 / 8 / 64 questions in flight (8, 8, 64 questions,
#                         max_tokens 256); HF strong (2 questions at in-flight
#                         1, 8 at in-flight 8) and HF naive (1 question, v0) at
#                         max_tokens 64, each beside Dendrite on the same
#                         questions and settings
#   wall.json / wall.md   bench_wall.py: single stream (256 tokens), best-of-16
#                         over a 2K prompt, two shipped DSL scripts; HF beside
#   headline.png          plot_headline.py (when matplotlib is installed)
#   run.log               every stage's output
# Each script saves its JSON after every row: a stage cut by its timeout keeps
# what it measured. Why these sizes: a 135M model decodes a ToT level of 256
# tokens in well under a second per question on an H100, so 8 questions per row
# give a stable per-question time; 64 at in-flight 64 is the batched regime;
# HF eager decode is host-bound per layer (17.8 ms/token at 16 layers in the issue-3
# run: ~30 ms expected at 30), so its ToT rows are capped at 64 tokens and 1-8
# questions, each compared with Dendrite on the same questions and settings.
set -u
MODEL=default
DEVICE=
QUICK=
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift 2 ;;
    --device) DEVICE="--device $2"; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    *) echo "device_run_16.sh: unknown argument $1 (--model DIR, --device D, --quick)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/out16}
BUDGET=${DEVICE_RUN_BUDGET:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run.log
: >"$LOG"
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD ;; esac

{
  echo "== environment"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, dendrite; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| dendrite from', dendrite.__file__)"
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -n 1
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -n 1
} 2>&1 | tee -a "$LOG"
if ! python3 -c "import dendrite.engine" 2>>"$LOG"; then
  echo "device_run_16.sh: cannot import dendrite.engine (install the wheels first); see $LOG" | tee -a "$LOG" >&2
  exit 1
fi

# stage NAME MIN_SECONDS MAX_SECONDS CMD...: run CMD if MIN_SECONDS remain, for at most MAX;
# the script's own --budget is the stage's time less a margin for start-up and the HF load.
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
  timeout --kill-after=10 "$left" "$@" --budget $((left * 85 / 100)) >>"$LOG" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
}

COMMON="--model $MODEL $DEVICE $QUICK"
if [ -n "$QUICK" ]; then
  TOT_ARGS=""
else
  TOT_ARGS="--num-questions 8 --in-flight 1,8,64 --max-tokens 256 --hf naive,strong \
--hf-questions 2 --hf-in-flight 1,8 --hf-naive-questions 1 --hf-naive-workloads v0 --hf-max-tokens 64"
fi
# shellcheck disable=SC2086
stage tot 60 330 python3 benchmarks/bench_tot_gsm8k.py $COMMON $TOT_ARGS --out "$OUT/tot.json"
# shellcheck disable=SC2086
stage wall 30 130 python3 benchmarks/bench_wall.py $COMMON --out "$OUT/wall.json"
python3 benchmarks/plot_headline.py --tot "$OUT/tot.json" --wall "$OUT/wall.json" \
  --out "$OUT/headline.png" 2>&1 | tee -a "$LOG"
echo
for f in tot wall; do
  [ -f "$OUT/$f.md" ] && cat "$OUT/$f.md" && echo
done
echo "== done in ${SECONDS}s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"

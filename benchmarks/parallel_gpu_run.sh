#!/usr/bin/env bash
# Issue 20 on 2 GPUs (nvidia-h200-x2 or h100-x2): the TP golden test, then bench_parallel.
# Usage: OUT=/path bash benchmarks/parallel_gpu_run.sh   (writes into $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/parallel-out}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python -m pytest tests/parallel/test_tp_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -30 > "$OUT/test_tp_gpu.txt"
timeout 420 python benchmarks/bench_parallel.py --sections plan,allreduce,decode \
    --out "$OUT/parallel.json" > "$OUT/bench_parallel.txt" 2>&1
timeout 300 python benchmarks/bench_parallel.py --sections replicas --questions 16 \
    --out "$OUT/replicas.json" > "$OUT/bench_replicas.txt" 2>&1
tail -5 "$OUT"/*.txt

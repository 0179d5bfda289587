"""Where an engine decode step's time goes: wall, GPU busy time, launches, host hot spots.

For each branch count B, forks B leaves off one shared prefix and decodes them
together (temperature 1, seeded; optionally under a regex that never forces a
token), then reports per step:

* wall time (median over `--steps`, after a warm-up), and how many of those
  steps the engine launched before reading the previous step's tokens;
* GPU time: the sum of kernel durations (torch.profiler), and kernel launches;
* the top host operations by self CPU time (torch.profiler);
* the top Python functions by own time (cProfile).

A step whose wall time is well above its GPU time is host-bound: the table
shows what the host does meanwhile.

    python3 benchmarks/profile_engine_step.py               # GPU, Llama-3.2-1B shape
    python3 benchmarks/profile_engine_step.py --device cpu --tiny --prefix 256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build(args) -> Path:
    import bench_gpu_model as bgm

    bgm.MODEL_DIR = args.model_dir
    args.model_dir.mkdir(parents=True, exist_ok=True)
    if not (args.model_dir / "model.safetensors").exists():
        bgm.stage_build(argparse.Namespace(device=args.device, tiny=args.tiny, seed=0), {})
    return args.model_dir


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def profile_branches(engine, root, n: int, args) -> dict:
    from dendrite.grammar import Constraint
    from dendrite.sampling import SamplingParams

    total = args.warmup + 3 * args.steps + 8
    kids = root.fork(n)
    constraint = Constraint(regex="[a-z ]{4000}") if args.grammar else None
    for i, k in enumerate(kids):
        engine.submit(k, SamplingParams(temperature=1.0, max_tokens=total, ignore_eos=True,
                                        seed=i), constraint=constraint)
    for _ in range(args.warmup):
        engine.step()
    sync(args.device)
    walls = []
    ahead0 = engine.stats.get("lookahead_steps", 0)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    out = {"B": n, "wall_ms": 1e3 * statistics.median(walls),
           "ahead": engine.stats.get("lookahead_steps", 0) - ahead0}

    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            engine.step()
        sync(args.device)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events
                 if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    kernels = sum(e.count for e in events
                  if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    out["gpu_ms"] = gpu_us / 1e3 / args.steps
    out["kernels"] = kernels / args.steps
    out["host_ops"] = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
    if args.device == "cuda":
        out["gpu_ops"] = events.table(sort_by="self_device_time_total", row_limit=args.top)

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.steps):
        engine.step()
    sync(args.device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
    out["python"] = s.getvalue()
    for k in kids:
        k.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--branches", default="1,16")
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--grammar", action="store_true", help="constrain every branch (regex)")
    ap.add_argument("--details", action="store_true", help="print the op and Python tables")
    args = ap.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/dendrite-tree-bench-" + ("tiny" if args.tiny else "llama-1b"))
    build(args)

    from dendrite.engine import Engine

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pages = (args.prefix + 64 * (3 * args.steps + args.warmup + 64)) // 16 + 1024
    engine = Engine(args.model_dir, device=args.device, dtype=dtype, num_pages=pages,
                    page_size=16, max_batch_tokens=8192, prefix_cache=False)
    vocab = engine.runner.vocab_size
    ids = np.random.default_rng(11).integers(16, vocab, size=args.prefix).tolist()
    with torch.inference_mode():
        root = engine.new_sequence(ids)
        engine.flush([root])
        rows = [profile_branches(engine, root, int(n), args) for n in args.branches.split(",")]
    base = rows[0]["wall_ms"]
    print(f"\nengine decode step over a {args.prefix}-token shared prefix "
          f"({'grammar' if args.grammar else 'free'}), {args.device}")
    print("| B | wall ms | vs first | GPU ms | kernels/step | steps launched ahead |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['B']} | {r['wall_ms']:.3f} | {r['wall_ms'] / base:.2f}x | "
              f"{r['gpu_ms']:.3f} | {r['kernels']:.0f} | {r['ahead']}/{args.steps} |")
    if args.details:
        for r in rows:
            print(f"\n===== B={r['B']}: host ops by self CPU time =====\n{r['host_ops']}")
            if "gpu_ops" in r:
                print(f"\n===== B={r['B']}: GPU kernels by time =====\n{r['gpu_ops']}")
            print(f"\n===== B={r['B']}: Python by own time =====\n{r['python']}")
    engine.close()


if __name__ == "__main__":
    main()

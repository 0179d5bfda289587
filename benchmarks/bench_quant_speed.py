"""Device speed of the quantization configurations (issue 17): decode steps, one stream and branches.

On a Llama-3.2-1B-shaped model with seeded random bf16 weights (built by
`bench_gpu_model.stage_build`: hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, tied head; `--shape 8b`: Llama-3.1-8B's,
hidden 4096, 32 layers, intermediate 14336, untied head), each configuration of bench_quant.py
(bf16, fp8kv, fp8w, fp8kv+fp8w, ...) gets its own `Engine` and is timed on:

* single stream: one sequence after a --prompt-token random prompt, greedy,
  ignore_eos; ms per decode step (= per token);
* branches: one --prefix-token random shared prefix, prefilled once, then
  `fork(1)` and `fork(--branches)` children decoding together; ms per step
  of each, and their ratio.

Timing: wall clock around `engine.step()` (the engine's own path: CUDA graphs,
cascade, look-ahead launch as its defaults choose), the median over --steps
steps after --warmup steps, device synchronised before the timed steps.
An engine that does not accept a configuration's options is a row "not
available: <error>". Targets: fp8kv+fp8w single stream >= 1.6x faster than
bf16; --branches branches over the prefix <= 1.3x the step of one branch.

Writes --out (JSON, after every row) and a .md table beside it.

    python benchmarks/bench_quant_speed.py --out speed.json              # GPU
    python benchmarks/bench_quant_speed.py --quick --device cpu --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import bench_quant as bq
import numpy as np
import torch

DEFAULT_CONFIGS = "bf16,fp8kv,fp8w,fp8kv+fp8w,fp8kv+fp8w+head"
#: Single-stream speedup over the reference: every weight FP8 (the head too), FP8 KV.
SPEEDUP_TARGET = ("fp8kv+fp8w+head", 1.6)
BRANCH_TARGET = 1.3  # step of --branches branches / step of one branch, same prefix


#: Llama-3.1-8B's shape (untied output projection), for `--shape 8b`.
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "tie_word_embeddings": False}


def build_model(model_dir: Path, device: torch.device, tiny: bool, shape: str = "1b") -> Path:
    """The random Llama-3.2-1B- (or 3.1-8B-) shaped model (tiny shape with --quick),
    built once."""
    import bench_gpu_model as bgm

    want = 256 if tiny else (LLAMA_8B if shape == "8b" else bgm.LLAMA_1B)["hidden_size"]
    cfg = model_dir / "config.json"
    if (model_dir / "model.safetensors").is_file() and cfg.is_file() \
            and json.loads(cfg.read_text()).get("hidden_size") == want:
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    bc.log(f"building random weights in {model_dir}")
    if shape == "8b" and not tiny:
        bgm.write_random_llama(model_dir, dict(bgm.LLAMA_1B, **LLAMA_8B), device.type, 0)
        return model_dir
    bgm.MODEL_DIR = model_dir
    bgm.stage_build(argparse.Namespace(device=device.type, tiny=tiny, seed=0), {})
    return model_dir


def time_steps(engine: Any, handles: list, warmup: int, steps: int) -> float:
    """Median wall ms of `steps` engine steps after `warmup` (the handles then run out)."""
    for _ in range(warmup):
        engine.step()
    bc.sync(engine.device)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    bc.sync(engine.device)
    engine.run(handles)  # the few tokens left
    return 1e3 * statistics.median(walls)


def decode(engine: Any, parent_or_ids: Any, n: int, a: argparse.Namespace) -> float:
    """ms per step of `n` greedy branches: forks of a flushed parent, or one new sequence."""
    from dendrite.sampling import SamplingParams

    if isinstance(parent_or_ids, list):
        seqs = [engine.new_sequence(parent_or_ids, add_bos=False)]
    else:
        seqs = parent_or_ids.fork(n)
    # +1: the first step of a fresh sequence prefills and samples its first token.
    params = SamplingParams(temperature=0.0, max_tokens=a.warmup + a.steps + 3, ignore_eos=True)
    handles = [engine.submit(s, params) for s in seqs]
    ms = time_steps(engine, handles, a.warmup + 1, a.steps)
    for s in seqs:
        s.release()
    return ms


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def render(d: dict[str, Any]) -> str:
    a = d["args"]
    out = ["## Quantization speed (issue 17)\n", f"{bc.env_line(d['env'])}\n",
           f"Median wall ms per engine step over {a['steps']} steps (after {a['warmup']}); single "
           f"stream after a {a['prompt_tokens']}-token prompt; branches over one "
           f"{a['prefix']}-token shared prefix.\n"
           + ("\n**--quick: a smoke run on a tiny shape, not a measurement.**\n" if a["quick"] else "")]
    header = ["config", "weights MB", "KV bytes/token", "1 stream ms/token", "speedup vs ref",
              "1 branch ms/step", f"{a['branches']} branches ms/step", "ratio", "status"]
    rows = []
    for r in d["rows"]:
        rows.append([r["config"] + (" (ref)" if r.get("reference") else ""),
                     bc.fmt(r.get("weight_bytes") and r["weight_bytes"] / 1e6, ".1f"),
                     bc.fmt(r.get("kv_bytes_per_token"), ".0f"),
                     bc.fmt(r.get("single_ms"), ".3f"), bc.fmt(r.get("speedup"), ".2f", "—") +
                     ("x" if r.get("speedup") else ""),
                     bc.fmt(r.get("b1_ms"), ".3f"), bc.fmt(r.get("bn_ms"), ".3f"),
                     bc.fmt(r.get("branch_ratio"), ".2f") + ("x" if r.get("branch_ratio") else ""),
                     r.get("status", "ok")])
    out.append(bc.md_table(header, rows, right={1, 2, 3, 4, 5, 6, 7}))
    if d.get("targets"):
        out.append("\n" + bc.md_table(["target", "measured", "verdict"],
                                      [[t["target"], t["measured"], t["verdict"]]
                                       for t in d["targets"]]))
    for n in d["notes"]:
        out.append(f"\nNote: {n}\n")
    return "".join(out)


def targets(rows: list[dict[str, Any]], a: argparse.Namespace) -> list[dict[str, str]]:
    out = []
    name, need = SPEEDUP_TARGET
    r = next((r for r in rows if r["config"] == name), None)
    if r is not None:
        sp = r.get("speedup")
        out.append({"target": f"{name} single stream >= {need}x the reference",
                    "measured": f"{sp:.2f}x" if sp else "—",
                    "verdict": ("PASS" if sp >= need else "FAIL") if sp else "not measured (see status)"})
    for r in rows:
        br = r.get("branch_ratio")
        out.append({"target": f"{r['config']}: {a.branches} branches <= {BRANCH_TARGET}x one branch "
                              f"over {a.prefix} tokens",
                    "measured": f"{br:.2f}x" if br else "—",
                    "verdict": ("PASS" if br <= BRANCH_TARGET else "FAIL") if br else "not measured (see status)"})
    if a.quick:
        for t in out:
            t["verdict"] += " (quick: not a measurement)"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype of every configuration")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"as bench_quant.py; the first is the reference (default {DEFAULT_CONFIGS})")
    p.add_argument("--shape", choices=("1b", "8b"), default="1b",
                   help="random model of Llama-3.2-1B's shape (tied head) or Llama-3.1-8B's")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random model is built (kept; rebuilt when the shape differs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shape, 256-token prefix, 4 branches, few steps (CPU smoke run)")
    p.add_argument("--prefix", type=int, default=None, help="shared prefix tokens (default 32768)")
    p.add_argument("--branches", type=int, default=None, help="branches over the prefix (16)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="single-stream prompt")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 8)")
    p.add_argument("--out", type=Path, required=True,
                   help="JSON result file (a .md table is written beside it)")
    a = p.parse_args(argv)
    for name, full, quick in (("prefix", 32768, 256), ("branches", 16, 4), ("steps", 32, 4),
                              ("warmup", 8, 2)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.prompt_tokens < 1:
        p.error(f"--prompt-tokens must be >= 1, got {a.prompt_tokens}")
    try:
        a.config_list = bq.parse_configs(a.configs)
    except ValueError as e:
        p.error(str(e))
    if a.model_dir is None:
        a.model_dir = Path(tempfile.gettempdir()) / (
            "dendrite-quant-speed-" + ("tiny" if a.quick else f"llama-{a.shape}"))
    a.model, a.budget = str(a.model_dir), None
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device = bc.resolve_device(a.device)
    build_model(a.model_dir, device, a.quick, a.shape)
    device, dtype, model_dir, _, res = bc.start("bench_quant_speed", a, render)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(11)
    prompt = rng.integers(16, vocab, size=a.prompt_tokens).tolist()
    prefix = rng.integers(16, vocab, size=a.prefix).tolist()
    tail = a.warmup + a.steps + 8
    tokens = a.prefix + a.branches * tail + a.prompt_tokens + tail
    num_pages = tokens // 16 + a.branches + 64
    ref_ms = None
    for i, name in enumerate(a.config_list):
        kwargs = bq.config_kwargs(name)
        row: dict[str, Any] = {"config": name, "options": kwargs, "reference": i == 0}
        bc.log(f"{name}: building the engine with {kwargs or 'no options'}")
        engine, why = bq.build_engine(model_dir, device, dtype, kwargs, num_pages=num_pages,
                                      page_size=16, max_batch_tokens=8192, prefix_cache=False)
        if engine is None:
            row["status"] = f"not available: {why}"
            bc.log(f"{name}: {row['status']}")
            res.add(row)
            continue
        try:
            row["weight_bytes"] = weight_bytes(engine.runner.model)
            row["kv_bytes_per_token"] = engine.memory_stats()["bytes_per_page"] / engine.page_size
            with torch.inference_mode():
                row["single_ms"] = decode(engine, prompt, 1, a)
                root = engine.new_sequence(prefix, add_bos=False)
                engine.flush([root])
                row["b1_ms"] = decode(engine, root, 1, a)
                row["bn_ms"] = decode(engine, root, a.branches, a)
                root.release()
            row["branch_ratio"] = row["bn_ms"] / row["b1_ms"]
            if i == 0:
                ref_ms = row["single_ms"]
            if ref_ms is not None:
                row["speedup"] = ref_ms / row["single_ms"]
            row["status"] = "ok"
            bc.log(f"{name}: 1 stream {row['single_ms']:.3f} ms, 1 branch {row['b1_ms']:.3f} ms, "
                   f"{a.branches} branches {row['bn_ms']:.3f} ms")
        except Exception as e:  # noqa: BLE001 - a failing configuration is a row
            row["status"] = f"error: {type(e).__name__}: {e}"
            bc.log(f"{name}: {row['status']}")
        finally:
            bq.free_engine(engine)
        res.add(row)
    res.data["targets"] = targets(res.rows, a)
    res.finish()
    return res.data


if __name__ == "__main__":
    main()

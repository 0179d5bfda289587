"""FP8 / MXFP8 weights on the device: the matmul kernels and decode steps, bf16 vs fp8 vs mxfp8.

Two sections, on the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256) with seeded random weights:

* kernels: each decoder projection (q|k|v 3072x2048, o 2048x2048, gate|up
  16384x2048, down 2048x8192) at 1 and 16 rows: the bf16 path the model takes
  (dendrite's GEMV / few-row kernel, else F.linear) against
  dendrite.kernels.fp8_matmul with fp8 (128x128) and mxfp8 (1x32) weights;
  microseconds (CUDA events, median of --iters) and the weight bytes streamed
  per microsecond (GB/s). `--sweep` also times every one-row tile candidate.
* model: `Engine(quantization=...)` for none / fp8 / mxfp8 (CUDA graphs and
  the engine's defaults): single-stream decode ms per token after a
  --prompt-token prompt, and the step of 16 greedy branches forked from it;
  median wall ms per `engine.step()` over --steps steps after --warmup, the
  device synchronised around each step. Also the first step's logits against
  bf16's (relative L2) as a sanity check.

Target (issue 17): fp8 KV + fp8 weights >= 1.6x bf16 single stream on a 1B+
model (weights' bytes halve; lm_head and the embedding stay bf16 here, see
bench_quant_speed.py's `+head` configurations for the head in FP8). Writes
--out (JSON) and prints a table.

    python benchmarks/bench_fp8_weights.py --out fp8w.json            # GPU, ~2 min on an H100
    python benchmarks/bench_fp8_weights.py --quick --out /tmp/f.json  # CPU dry run, tiny shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.append(str(HERE.parent))

import torch

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}
FORMATS = ("none", "fp8", "mxfp8")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(out: Path, cfg: dict[str, Any], device: torch.device) -> Path:
    """config.json, tokenizer and seeded N(0, 0.02) bf16 weights (norms ~1), once."""
    import bench_gpu_model as bgm

    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and \
            json.loads((out / "config.json").read_text()).get("hidden_size") == cfg["hidden_size"]:
        return out
    log(f"building random weights in {out}")
    bgm.write_random_llama(out, cfg, device, seed=0)
    return out


def _time_us(fn, device: torch.device, iters: int) -> float:
    """Median microseconds of fn() (CUDA events on the GPU)."""
    for _ in range(3):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(out)


def kernel_rows(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, iters: int,
                sweep: bool) -> list[dict[str, Any]]:
    """One row per (projection, rows, format): microseconds and GB/s of weight bytes."""
    from dendrite.kernels import fp8_matmul as fk
    from dendrite.kernels import linear
    from dendrite.quant import quant_linear
    from dendrite.quant.formats import quantize

    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
    shapes = {"qkv_proj": (q, h), "o_proj": (h, cfg["num_attention_heads"] * d),
              "gate_up_proj": (2 * i, h), "down_proj": (h, i),
              "lm_head": (cfg["vocab_size"], h)}
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(dtype)
        qs = {f: quantize(w, f) for f in FORMATS[1:]}
        for m in (1, 16):
            x = torch.randn(m, k, device=device, generator=g).to(dtype)
            cases = {"none": (lambda x=x, w=w: linear(x, w), n * k * w.element_size())}
            for f, qw in qs.items():
                nbytes = qw.data.numel() + qw.scale.numel() * qw.scale.element_size()
                cases[f] = ((lambda x=x, qw=qw: quant_linear(x, qw)), nbytes)
            for f, (fn, nbytes) in cases.items():
                us = _time_us(fn, device, iters)
                rows.append({"proj": name, "n": n, "k": k, "rows": m, "format": f, "us": us,
                             "gbps": nbytes / us / 1e3, "weight_bytes": nbytes})
            if sweep and m == 1 and device.type == "cuda":
                # The GEMV's (BLOCK_N, BLOCK_K, num_warps) on the fp8 weight.
                qw = qs["fp8"]
                for bn in (1, 2, 4, 8, 16, 32):
                    for bk in (256, 512, 1024, 2048):
                        for warps in (4, 8):
                            tile = (bn, min(bk, k), warps)
                            us = _time_us(lambda tile=tile, x=x, qw=qw: fk._launch(
                                x, qw.data, qw.scale, None, *qw.block, tile=tile), device,
                                iters)
                            rows.append({"proj": name, "n": n, "k": k, "rows": 1,
                                         "format": "fp8", "tile": list(tile), "us": us,
                                         "gbps": qw.data.numel() / us / 1e3})
        del w, qs
    return rows


def _step_ms(engine: Any, handles: list, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        engine.step()
    walls = []
    for _ in range(steps):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.step()
        sync(engine.device)
        walls.append(time.perf_counter() - t0)
    for hd in handles:
        engine.cancel(hd)
    return 1e3 * statistics.median(walls)


def model_rows(model_dir: Path, device: torch.device, dtype: torch.dtype,
               a: argparse.Namespace) -> list[dict[str, Any]]:
    """Single-stream and 16-branch decode step per format, and first-step logits vs bf16."""
    import numpy as np

    from dendrite import Engine, SamplingParams
    from dendrite.quant import weight_format

    prompt = [int(t) for t in np.random.default_rng(0).integers(10, 500, a.prompt_tokens)]
    rows, ref = [], None
    for f in FORMATS:
        log(f"model: quantization={f}")
        eng = Engine(model_dir, device=str(device), dtype=dtype, quantization=f,
                     num_pages=a.num_pages, kv_dtype=a.kv_dtype)
        try:
            r = eng.runner
            n = len(prompt)
            page = r.page_size
            pages = -(-n // page)  # the prompt's pages, 0..pages-1 of the fresh pool
            meta = r.build_metadata(np.arange(n), np.arange(n), np.array([0, n]),
                                    np.array([0, pages]), np.arange(pages),
                                    np.array([n - (pages - 1) * page]))
            logits = r.run(torch.tensor(prompt), meta).float()
            ref = logits if ref is None else ref
            row = {"format": f, "weights": weight_format(r.model),
                   "weight_bytes": sum(t.numel() * t.element_size()
                                       for t in list(r.model.parameters())
                                       + list(r.model.buffers())),
                   "logits_rel_l2_vs_bf16": float((logits - ref).norm() / ref.norm())}
            params = SamplingParams(temperature=0.0, ignore_eos=True,
                                    max_tokens=a.warmup + a.steps + 4)
            seq = eng.new_sequence(prompt, add_bos=False)
            row["single_ms"] = _step_ms(eng, [eng.submit(seq, params)], a.warmup + 1, a.steps)
            kids = seq.fork(16)
            row["branches16_ms"] = _step_ms(eng, [eng.submit(s, params) for s in kids],
                                            a.warmup + 1, a.steps)
            rows.append(row)
        finally:
            eng.close()
            del eng
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = rows[0]["single_ms"]
    for row in rows:
        row["speedup_vs_bf16"] = base / row["single_ms"]
    return rows


def render(res: dict[str, Any]) -> str:
    out = [f"## FP8 / MXFP8 weights ({res['device']}, {res['dtype']}"
           + (", --quick: tiny shape, not a measurement" if res["quick"] else "") + ")\n",
           "\n| projection | rows | format | us | GB/s |\n| --- | ---: | --- | ---: | ---: |\n"]
    for r in res["kernels"]:
        if "tile" not in r:
            out.append(f"| {r['proj']} {r['n']}x{r['k']} | {r['rows']} | {r['format']} | "
                       f"{r['us']:.1f} | {r['gbps']:.0f} |\n")
    tiles = [r for r in res["kernels"] if "tile" in r]
    if tiles:
        out.append("\nOne-row fp8 tile sweep (best per projection; the rule's tile in the "
                   "table above):\n")
        for proj in dict.fromkeys(r["proj"] for r in tiles):
            best = min((r for r in tiles if r["proj"] == proj), key=lambda r: r["us"])
            out.append(f"- {proj}: tile {best['tile']} {best['us']:.1f} us "
                       f"{best['gbps']:.0f} GB/s\n")
    out.append("\n| weights | weight MB | logits rel. L2 vs bf16 | 1 stream ms/token | speedup "
               "| 16 branches ms/step |\n| --- | ---: | ---: | ---: | ---: | ---: |\n")
    for r in res["model"]:
        out.append(f"| {r['format']} | {r['weight_bytes'] / 1e6:.0f} | "
                   f"{r['logits_rel_l2_vs_bf16']:.4f} | {r['single_ms']:.3f} | "
                   f"{r['speedup_vs_bf16']:.2f}x | {r['branches16_ms']:.3f} |\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--quick", action="store_true", help="tiny shape on the CPU, few iterations")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random model is built (default: a temp dir)")
    p.add_argument("--iters", type=int, default=50, help="kernel timings: median of this many")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per format")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--num-pages", type=int, default=2048)
    p.add_argument("--kv-dtype", default=None, help="the engines' KV format (e.g. fp8_e4m3)")
    p.add_argument("--sweep", action="store_true", help="also time the one-row fp8 tiles")
    p.add_argument("--sections", default="kernels,model")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.quick
                                       else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(LLAMA_1B, **(TINY if a.quick else {}))
    if a.quick:
        a.iters, a.steps, a.warmup, a.prompt_tokens, a.num_pages = 3, 3, 1, 40, 64
    model_dir = a.model_dir or Path(tempfile.gettempdir()) / (
        "dendrite-bench-fp8w-" + ("tiny" if a.quick else "llama1b"))
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu", "dtype": str(dtype).replace("torch.", ""),
                           "quick": a.quick, "torch": torch.__version__, "args": {
                               k: str(v) for k, v in vars(a).items()},
                           "kernels": [], "model": []}
    sections = a.sections.split(",")
    if "kernels" in sections:
        res["kernels"] = kernel_rows(cfg, device, dtype, a.iters, a.sweep)
        a.out.write_text(json.dumps(res, indent=1))
    if "model" in sections:
        model_dir = build_model(model_dir, cfg, device)
        res["model"] = model_rows(model_dir, device, dtype, a)
    a.out.write_text(json.dumps(res, indent=1))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

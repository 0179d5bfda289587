"""KV compression: bytes per token and accuracy of N-bit KV pages (issue 17, part 3).

Two tables:

* **bytes per token** of the KV cache (K and V over every layer, scales
  included) for the model measured and two common shapes: the model dtype
  (bf16), FP8, and the N-bit page formats (dendrite/model/kv_quant.py).
* **accuracy** on a real model (default: SmolLM2-135M-Instruct): a fixed text
  (GSM8K test questions, ../shared/data/gsm8k/test.jsonl, else
  benchmarks/data/gsm8k_test_200.jsonl) is prefilled once
  with KV in the model dtype (the baseline) and once per compressed format,
  every position's logits compared: top-1 agreement with the baseline, mean
  KL(baseline || format), and the text's perplexity. Per layer, the attention
  output with the format's round-tripped K/V against the exact one (the
  baseline's q/K/V recorded per layer, so this error is not compounded
  across layers): relative L2 error, mean and worst layer.

Rows: int4 / int3 with one fp16 scale+min per (token, head) (the engine's
`kv_dtype="int4"` / `"int3"`), the same with groups of 32 channels, int4
without the rotation (ablation), and FP8 when this checkout's runner has it
(`kv_dtype="fp8_e4m3"`).

A third table on CUDA (`--sections kernels`): decode attention time per layer
call over int4 / int3 pages (`QuantKVBackend`: q rotation, the Triton
kernel, output rotation; and the kernel alone) against bf16 pages
(FlashInfer when installed, else the torch reference), with the KV bytes each
reads and the bandwidth that makes; and the write of one step's K/V (Triton
writer, torch writer, bf16 store).

    python benchmarks/bench_kv_compress.py --out results/kv_compress.json
    python benchmarks/bench_kv_compress.py --device cuda --sections bytes,kernels \
        --out $OUT/kv_compress.json

CPU, bf16, 1024 tokens: about ten minutes for SmolLM2-135M on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import torch

from dendrite.attention.quant_kv import QuantKVBackend
from dendrite.attention.reference import ReferenceBackend
from dendrite.model.kv_quant import KVQuantFormat, rotation_matrix
from dendrite.model.kv_quant_cache import QuantKVCache
from dendrite.model.loader import load, load_config
from dendrite.model.runner import ModelRunner

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
if not GSM8K.is_file():  # a checkout without the shared data: the repo's first 200 questions
    GSM8K = HERE / "data" / "gsm8k_test_200.jsonl"

#: Other shapes for the bytes table: (layers, KV heads, head_dim).
SHAPES = {"Llama-3.1-8B": (32, 8, 128), "Qwen2.5-7B": (28, 4, 128)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    """A compressed KV format: how to build its pool + backend, and its K/V round trip."""

    name: str
    bits: int
    group: int | None
    rotate: bool = True

    def format(self, head_dim: int) -> KVQuantFormat:
        """The format at `head_dim` (a group wider than the head is the head)."""
        return KVQuantFormat(self.bits, head_dim,
                             min(self.group, head_dim) if self.group else None)


VARIANTS = [
    Variant("int4", 4, None),
    Variant("int4 g32", 4, 32),
    Variant("int4 no-rotation", 4, None, rotate=False),
    Variant("int3", 3, None),
    Variant("int3 g32", 3, 32),
]


def bytes_table(layers: int, hkv: int, d: int, model_bytes: int) -> dict[str, int]:
    """Bytes per token of each format at this shape (K and V, every layer)."""
    elems = layers * 2 * hkv * d
    out = {"bf16": elems * model_bytes if model_bytes == 2 else elems * 2, "fp8": elems}
    for v in VARIANTS:
        if v.rotate:
            out[v.name] = v.format(d).bytes_per_token(layers, hkv)
    return out


def text_ids(tokenizer: Any, n: int) -> list[int]:
    """The first `n` tokens of the GSM8K test questions, joined by blank lines."""
    if not GSM8K.is_file():
        raise SystemExit(f"missing {GSM8K}: the accuracy rows read GSM8K test questions")
    parts, ids = [], []
    with GSM8K.open() as f:
        for line in f:
            parts.append(json.loads(line)["question"])
            ids = tokenizer.encode("\n\n".join(parts))
            if len(ids) >= n:
                break
    return ids[:n]


class Recorder(ReferenceBackend):
    """The reference backend, keeping every layer's q and gathered K/V (float32, CPU)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.q: dict[int, torch.Tensor] = {}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, layer, q, k_cache, v_cache):
        p = self._prefills[0]
        self.q[layer] = q.float().cpu()
        self.kv[layer] = (self._gather(k_cache, p.slots).cpu(),
                          self._gather(v_cache, p.slots).cpu())
        return super().forward(layer, q, k_cache, v_cache)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 causal attention, q [T, Hq, D] over k/v [T, Hkv, D] (GQA)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[0]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def attention_errors(rec: Recorder, roundtrip: Callable[[int, int, torch.Tensor], torch.Tensor]
                     ) -> dict[str, float]:
    """Per-layer relative error of attention with round-tripped K/V; also of K and V."""
    errs, kerr, verr = [], [], []
    for layer in sorted(rec.q):
        q, (k, v) = rec.q[layer], rec.kv[layer]
        k2, v2 = roundtrip(layer, 0, k), roundtrip(layer, 1, v)
        exact = causal_attention(q, k, v)
        errs.append(((causal_attention(q, k2, v2) - exact).norm() / exact.norm()).item())
        kerr.append(((k2 - k).norm() / k.norm()).item())
        verr.append(((v2 - v).norm() / v.norm()).item())
    mean = lambda xs: sum(xs) / len(xs)
    return {"attn_rel_err_mean": mean(errs), "attn_rel_err_max": max(errs),
            "k_rel_err": mean(kerr), "v_rel_err": mean(verr)}


def nbit_roundtrip(fmt: KVQuantFormat, m: torch.Tensor):
    def rt(layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
        return fmt.dequantize(fmt.quantize(x @ m)) @ m.T
    return rt


def logits_stats(logits: torch.Tensor, base: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """top-1 agreement and KL vs the baseline; perplexity of the text (next-token)."""
    lp, bp = logits.float().log_softmax(-1), base.float().log_softmax(-1)
    kl = (bp.exp() * (bp - lp)).sum(-1).mean().item()
    nll = -lp[:-1].gather(1, ids[1:, None]).mean().item()
    return {"top1_agree": (logits.argmax(-1) == base.argmax(-1)).float().mean().item(),
            "kl": kl, "ppl": math.exp(nll)}


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids`, prefilled as one chunk from page 0."""
    t, ps = len(ids), runner.page_size
    pages = (t + ps - 1) // ps
    meta = runner.build_metadata(list(range(t)), list(range(t)), [0, t], [0, pages],
                                 list(range(pages)), [t - (pages - 1) * ps])
    return runner.run(ids, meta, logits_indices=list(range(t))).float().cpu()


#: Decode shapes of the kernel table: (name, Hq, Hkv, D, batch, context).
KERNEL_SHAPES = [
    ("Llama-8B 1x32K", 32, 8, 128, 1, 32768),
    ("Llama-8B 16x4K", 32, 8, 128, 16, 4096),
    ("Llama-8B 64x1K", 32, 8, 128, 64, 1024),
    ("SmolLM2 16x4K", 9, 3, 64, 16, 4096),
]


#: `--quick` (a CPU smoke test under TRITON_INTERPRET=1): tiny shapes.
QUICK_SHAPES = [("quick 2x40", 4, 2, 64, 2, 40)]


def _time_cuda(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median microseconds of `fn` (CUDA events; wall clock off CUDA)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return sorted(times)[len(times) // 2]


def kernel_rows(device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    """Decode attention and K/V write timings per layer call (see the docstring)."""
    from dendrite.attention.base import build_attention_metadata
    from dendrite.kernels import kv_quant_attention as kqa
    from dendrite.kernels.kv_quant_write import write_rows

    rows = []
    for name, hq, hkv, d, bsz, ctx in (QUICK_SHAPES if quick else KERNEL_SHAPES):
        ps = 16
        per = (ctx + ps - 1) // ps
        num_pages = bsz * per
        meta = build_attention_metadata(
            [ctx - 1] * bsz, [(b * per + per - 1) * ps + (ctx - 1) % ps for b in range(bsz)],
            list(range(bsz + 1)), [b * per for b in range(bsz + 1)], list(range(num_pages)),
            [ctx - (per - 1) * ps] * bsz, page_size=ps, device=device)
        q = torch.randn(bsz, hq, d, device=device, dtype=torch.bfloat16)
        row: dict[str, Any] = {"shape": name}
        kb = torch.randn(num_pages, ps, hkv, d, device=device, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        try:
            if quick:
                raise ImportError("--quick: the reference")
            from dendrite.attention.flashinfer_backend import FlashInferBackend
            ref_be: Any = FlashInferBackend(hq, hkv, d, page_size=ps, dtype=torch.bfloat16,
                                            device=device)
            row["bf16 backend"] = "flashinfer"
        except Exception:  # noqa: BLE001 (not installed: the reference is the yardstick)
            ref_be = ReferenceBackend(hq, hkv, d, ps)
            row["bf16 backend"] = "reference"
        ref_be.plan(meta)
        row["bf16 us"] = _time_cuda(lambda: ref_be.forward(0, q, kb, vb))
        row["bf16 KV MB"] = bsz * ctx * hkv * d * 2 * 2 / 1e6
        for kv_dtype in ("int4", "int3"):
            fmt = KVQuantFormat(4 if kv_dtype == "int4" else 3, d)
            pool = QuantKVCache(1, num_pages, ps, hkv, fmt, device, dtype=torch.bfloat16)
            chunk = 1 << 16
            slots = torch.arange(num_pages * ps, device=device)
            for i in range(0, len(slots), chunk):
                s_ = slots[i:i + chunk]
                pool.write(0, s_, torch.randn(len(s_), hkv, d, device=device),
                           torch.randn(len(s_), hkv, d, device=device))
            be = QuantKVBackend(hq, hkv, d, fmt, pool.rotation, ps, use_triton=not quick)
            be.plan(meta)
            kc, vc = pool.layer(0)
            row[f"{kv_dtype} us"] = _time_cuda(lambda: be.forward(0, q, kc, vc))
            qr = q.float() @ pool.rotation
            row[f"{kv_dtype} kernel us"] = _time_cuda(lambda: kqa.decode_attention(
                qr, kc, vc, meta.kv_indptr, meta.kv_indices, meta.kv_lens, fmt, d**-0.5,
                max_kv_len=ctx))
            if kv_dtype == "int4":  # the other way of loading codes, for comparison
                row["int4 gather kernel us"] = _time_cuda(lambda: kqa.decode_attention(
                    qr, kc, vc, meta.kv_indptr, meta.kv_indices, meta.kv_lens, fmt, d**-0.5,
                    max_kv_len=ctx, contiguous=False))
            row[f"{kv_dtype} KV MB"] = bsz * ctx * hkv * 2 * fmt.row_bytes / 1e6
        for k in ("bf16", "int4", "int3"):
            t_us = row[f"{k} kernel us"] if k != "bf16" else row["bf16 us"]
            row[f"{k} TB/s"] = row[f"{k} KV MB"] / t_us  # MB per µs is TB per s
        rows.append(row)
        log(f"kernels {row}")
    # one decode step's K/V write per layer (T = batch rows) and a prefill chunk's
    for t in ((16,) if quick else (1, 64, 2048)):
        hkv, d = 8, 128
        fmt = KVQuantFormat(4, d)
        pages = torch.zeros(256, 16, hkv, fmt.row_bytes, dtype=torch.uint8, device=device)
        bf = torch.zeros(256 * 16, hkv, d, dtype=torch.bfloat16, device=device)
        x = torch.randn(t, hkv, d, device=device, dtype=torch.bfloat16)
        slots = torch.randperm(256 * 16, device=device)[:t]
        m = rotation_matrix(d).to(device)
        flat = pages.view(-1, hkv, fmt.row_bytes)

        def torch_write() -> None:
            flat[slots] = fmt.quantize(x.float() @ m)

        def bf_write() -> None:
            bf[slots] = x

        rows.append({"shape": f"write T={t} (Hkv 8, D 128)",
                     "int4 triton write us": _time_cuda(
                         lambda: write_rows(x, slots, pages, m, fmt)),
                     "int4 torch write us": _time_cuda(torch_write),
                     "bf16 store us": _time_cuda(bf_write)})
        log(f"kernels {rows[-1]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF model dir, or 'default'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (the baseline KV dtype)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of GSM8K text")
    ap.add_argument("--out", type=Path, required=True, help="JSON result (a .md beside it)")
    ap.add_argument("--sections", default="bytes,accuracy",
                    help="comma-separated: bytes, accuracy, kernels (CUDA)")
    ap.add_argument("--quick", action="store_true",
                    help="kernels: one tiny shape (a CPU smoke test under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= {"bytes", "accuracy", "kernels"}:
        raise SystemExit(f"--sections: bytes, accuracy, kernels; got {args.sections!r}")
    torch.manual_seed(0)

    if args.model == "default":
        from dendrite.default_model import TINY_NAME, default_model_dir
        model_dir = Path(default_model_dir())
        if model_dir.name.startswith(TINY_NAME) and "accuracy" in sections:
            log("the default model fell back to the tiny random-weight model: no accuracy rows")
            sections.discard("accuracy")
    else:
        model_dir = Path(args.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.time()
    cfg = load_config(model_dir)
    result: dict[str, Any] = {"model": str(model_dir), "device": str(device),
                              "dtype": args.dtype}
    if "bytes" in sections:
        result["bytes_per_token"] = {"measured model": bytes_table(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2)}
        result["bytes_per_token"].update({k: bytes_table(*s, 2) for k, s in SHAPES.items()})
    if "accuracy" in sections:
        result.update(accuracy(model_dir, device, dtype, args.tokens, args.dtype))
    if "kernels" in sections:
        if device.type != "cuda" and not args.quick:
            raise SystemExit("--sections kernels needs --device cuda (or --quick)")
        result["kernels"] = kernel_rows(device, args.quick)
        result["gpu"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else "CPU, Triton interpreter")
    result["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def accuracy(model_dir: Path, device: torch.device, dtype: torch.dtype, tokens: int,
             dtype_name: str) -> dict[str, Any]:
    """The accuracy rows: baseline, each N-bit variant, FP8 where the runner has it."""
    t0 = time.time()
    loaded = load(model_dir, device, dtype)
    cfg = loaded.config
    ids = text_ids(loaded.tokenizer, tokens)
    num_pages = (len(ids) + 15) // 16 + 1
    rec = Recorder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16,
                   sliding_windows=cfg.sliding_windows)
    runner = ModelRunner(loaded, device, dtype, num_pages=num_pages, attention=rec)
    base = prefill_logits(runner, ids)
    ids_t = torch.tensor(ids)
    log(f"baseline: {len(ids)} tokens, {time.time() - t0:.1f}s")
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[dict[str, Any]] = [{
        "format": f"{dtype_name} (baseline)",
        "bytes_per_token": cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem,
        **logits_stats(base, base, ids_t)}]

    for v in VARIANTS:
        t1 = time.time()
        fmt = v.format(cfg.head_dim)
        pool = QuantKVCache(cfg.num_layers, num_pages, 16, cfg.num_kv_heads, fmt, device,
                            dtype=dtype)
        if not v.rotate:
            pool.rotation = torch.eye(cfg.head_dim, device=device)
        runner.kv_cache = pool
        runner.backend = runner.model.backend = QuantKVBackend(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, fmt, pool.rotation, 16)
        logits = prefill_logits(runner, ids)
        row = {"format": v.name, "bytes_per_token": fmt.bytes_per_token(cfg.num_layers,
                                                                        cfg.num_kv_heads),
               **logits_stats(logits, base, ids_t),
               **attention_errors(rec, nbit_roundtrip(fmt, pool.rotation.cpu()))}
        rows.append(row)
        log(f"{v.name}: {time.time() - t1:.1f}s {row}")

    try:  # FP8 pages, where this checkout's runner has them
        r8 = ModelRunner(loaded, device, dtype, num_pages=num_pages, attention="reference",
                         kv_dtype="fp8_e4m3")
    except (TypeError, ValueError) as e:
        log(f"fp8 row skipped: {e}")
    else:
        from dendrite.model.kv_cache import dequantize, quantize

        sc = r8.kv_cache.scales

        def fp8_rt(layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
            s = (sc.k if which == 0 else sc.v)[layer]
            return dequantize(quantize(x, s), s)

        logits = prefill_logits(r8, ids)
        rows.append({"format": "fp8_e4m3", "bytes_per_token": r8.kv_bytes_per_token,
                     **logits_stats(logits, base, ids_t), **attention_errors(rec, fp8_rt)})
    return {"tokens": len(ids), "text": str(GSM8K), "accuracy": rows}


def render(r: dict[str, Any]) -> str:
    """The markdown tables of the sections that ran."""
    out: list[str] = []
    if "bytes_per_token" in r:
        cols = list(next(iter(r["bytes_per_token"].values())))
        out += ["## Bytes per token (K+V, all layers, scales included)\n",
                "| shape | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        for shape, row in r["bytes_per_token"].items():
            bf = row["bf16"]
            out.append(f"| {shape} | " + " | ".join(f"{b} ({bf / b:.2f}x)"
                                                  for b in row.values()) + " |")
        out.append("")
    if "accuracy" in r:
        out += [(f"## Accuracy: {Path(r['model']).name}, {r['tokens']} tokens of GSM8K "
                 f"questions, {r['dtype']} on {r['device']}\n"),
                ("| KV format | bytes/token | top-1 agree | KL | ppl | attn rel err mean | "
                 "attn rel err max layer | K rel err | V rel err |"),
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["accuracy"]:
            f = lambda k, fmt: (fmt.format(row[k]) if k in row else "")
            out.append(f"| {row['format']} | {row.get('bytes_per_token', '')} | "
                       f"{f('top1_agree', '{:.4f}')} | {f('kl', '{:.4f}')} | "
                       f"{f('ppl', '{:.3f}')} | {f('attn_rel_err_mean', '{:.4f}')} | "
                       f"{f('attn_rel_err_max', '{:.4f}')} | {f('k_rel_err', '{:.4f}')} | "
                       f"{f('v_rel_err', '{:.4f}')} |")
        out.append("")
    if "kernels" in r:
        out += [f"## Kernels on {r.get('gpu', 'CUDA')} (median us per layer call)\n"]
        keys: list[str] = []
        for row in r["kernels"]:
            keys += [k for k in row if k not in keys and k != "shape"]
        out += ["| shape | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for row in r["kernels"]:
            cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
            out.append(f"| {row['shape']} | " + " | ".join(cell(row[k]) if k in row else ""
                                                         for k in keys) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

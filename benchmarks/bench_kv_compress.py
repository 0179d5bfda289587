"""KV compression: bytes per token and accuracy of N-bit KV pages (issue 17, part 3).

Two tables:

* **bytes per token** of the KV cache (K and V over every layer, scales
  included) for the model measured and two common shapes: the model dtype
  (bf16), FP8, and the N-bit page formats (dendrite/model/kv_quant.py).
* **accuracy** on a real model (default: SmolLM2-135M-Instruct): a fixed text
  (GSM8K test questions, ../shared/data/gsm8k/test.jsonl) is prefilled once
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

    python benchmarks/bench_kv_compress.py --out results/kv_compress.json
    python benchmarks/bench_kv_compress.py --device cuda --out $OUT/kv_compress.json

CPU, bf16, 1024 tokens: about a minute for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import torch  # noqa: E402

from dendrite.attention.quant_kv import QuantKVBackend  # noqa: E402
from dendrite.attention.reference import ReferenceBackend  # noqa: E402
from dendrite.model.kv_quant import KVQuantFormat, rotation_matrix  # noqa: E402
from dendrite.model.kv_quant_cache import QuantKVCache  # noqa: E402
from dendrite.model.loader import load  # noqa: E402
from dendrite.model.runner import ModelRunner  # noqa: E402

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

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
            out[v.name] = KVQuantFormat(v.bits, d, v.group).bytes_per_token(layers, hkv)
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

    def forward(self, layer, q, k_cache, v_cache):  # noqa: D102 (a bench helper)
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
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF model dir, or 'default'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (the baseline KV dtype)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of GSM8K text")
    ap.add_argument("--out", type=Path, required=True, help="JSON result (a .md beside it)")
    args = ap.parse_args()
    torch.manual_seed(0)

    if args.model == "default":
        from dendrite.default_model import default_model_dir
        model_dir = Path(default_model_dir())
    else:
        model_dir = Path(args.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.time()
    loaded = load(model_dir, device, dtype)
    cfg = loaded.config
    ids = text_ids(loaded.tokenizer, args.tokens)
    num_pages = (len(ids) + 15) // 16 + 1
    rec = Recorder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16,
                   sliding_windows=cfg.sliding_windows)
    runner = ModelRunner(loaded, device, dtype, num_pages=num_pages, attention=rec)
    base = prefill_logits(runner, ids)
    ids_t = torch.tensor(ids)
    log(f"baseline: {len(ids)} tokens, {time.time() - t0:.1f}s")
    rows: list[dict[str, Any]] = [{"format": f"{args.dtype} (baseline)",
                                   **logits_stats(base, base, ids_t)}]

    for v in VARIANTS:
        t1 = time.time()
        fmt = KVQuantFormat(v.bits, cfg.head_dim, v.group)
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

    elem = torch.empty((), dtype=dtype).element_size()
    sizes = {"measured model": bytes_table(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, elem)}
    sizes.update({k: bytes_table(*s, 2) for k, s in SHAPES.items()})
    rows[0]["bytes_per_token"] = sizes["measured model"]["bf16"]

    result = {"model": str(model_dir), "device": str(device), "dtype": args.dtype,
              "tokens": len(ids), "text": str(GSM8K), "accuracy": rows, "bytes_per_token": sizes,
              "seconds": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def render(r: dict[str, Any]) -> str:
    """The two markdown tables."""
    out = [f"## Bytes per token (K+V, all layers, scales included)\n",
           "| shape | " + " | ".join(next(iter(r["bytes_per_token"].values()))) + " |",
           "| --- |" + " --- |" * len(next(iter(r["bytes_per_token"].values())))]
    for shape, row in r["bytes_per_token"].items():
        bf = row["bf16"]
        out.append(f"| {shape} | " + " | ".join(f"{b} ({bf / b:.2f}x)" for b in row.values())
                   + " |")
    out += ["", f"## Accuracy: {Path(r['model']).name}, {r['tokens']} tokens of GSM8K "
                f"questions, {r['dtype']} on {r['device']}\n",
            "| KV format | bytes/token | top-1 agree | KL | ppl | attn rel err mean | "
            "attn rel err max layer | K rel err | V rel err |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["accuracy"]:
        f = lambda k, fmt: (fmt.format(row[k]) if k in row else "")  # noqa: E731
        out.append(f"| {row['format']} | {row.get('bytes_per_token', '')} | "
                   f"{f('top1_agree', '{:.4f}')} | {f('kl', '{:.4f}')} | {f('ppl', '{:.3f}')} | "
                   f"{f('attn_rel_err_mean', '{:.4f}')} | {f('attn_rel_err_max', '{:.4f}')} | "
                   f"{f('k_rel_err', '{:.4f}')} | {f('v_rel_err', '{:.4f}')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

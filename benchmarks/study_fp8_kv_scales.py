"""Study (issue 17): does any choice of FP8 KV scales close fp8kv's top-1 gap?

`Engine(kv_dtype="fp8_e4m3")` misses the top-1 agreement gate (>= 99% of the
positions where bf16's top-1 beats its top-2 by > 0.1 nats) while its
perplexity passes. This script scores bench_quant.py's perplexity text
(GSM8K test, windows of --window tokens) with one bf16 engine per variant and
compares each with plain bf16 pages, as bench_quant does.

How a variant is emulated: the engine's KV pool is swapped for a float32 one
(the reference backend reads it as it is, in float32 like the FP8 readers'
dequantized rows) and the pool's `write` is replaced by the variant's
quantize-dequantize round trip (torch's float8_e4m3fn cast, round to nearest
even, saturating at 448) of the bf16 K (after RoPE) and V the model writes.
Values are stored dequantized, so a per-head or per-token scale needs no
reader support here; that is the same math as folding a per-head scale into q
/ the output (up to float32 rounding). K is stored less its calibrated mean
where the variant says so; attention is invariant to it, as in the engine.
Hooks live here only; the package is untouched.

Variants (calibration = one forward over kv_calibration.CALIBRATION_TEXT,
first 256 tokens, as `calibrate_kv_scales` does):

    emu-identity   float32 store, no rounding: must agree 100% with bf16 (harness check)
    fp8kv-engine   the real Engine(kv_dtype="fp8_e4m3") (must equal v1)
    v1-layer-pow2  the engine's choice: per-layer power-of-two scale (HEADROOM 4), K - mean
    v2-layer-exact per-layer scale amax / 448 (calibration amax, no headroom), K - mean
    v3-head-pow2   per-(layer, KV head) power-of-two scale (HEADROOM 4), K - mean
    v3-head-exact  per-(layer, KV head) scale amax / 448, K - mean
    v4-token-head  per-(token, KV head) dynamic scale amax / 448 of that row, K - mean
    v5-nomean      per-layer power-of-two scale of raw K (no mean subtraction)
    had-k / had-kv v1 with K (and V) stored rotated by an orthonormal Hadamard matrix
                   (a reader rotates q / the output back: exact math); scale from the
                   rotated calibration amax: does spreading channels help e4m3?
    k-only / v-only  v1 on K only (V kept bf16) / on V only: which side loses top-1
    int8-token-head  symmetric int8, per-(token, KV head) scale amax / 127, K - mean
    mN-ideal       a float with N mantissa bits and unbounded exponent (no scale matters),
                   K - mean: how agreement grows with mantissa bits (m3 = e4m3 without range)

    OMP_NUM_THREADS=2 python benchmarks/study_fp8_kv_scales.py --tokens 4096 \\
        --out /tmp/fp8_study.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc
import bench_quant as bq

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MARGINS = (0.1, 0.25, 0.5, 1.0)


# -- calibration ---------------------------------------------------------------------


class _Recorder:
    """Duck-typed KV store that keeps every layer's K (after RoPE) and V in float32."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.k: list[torch.Tensor | None] = [None] * cache.num_layers
        self.v: list[torch.Tensor | None] = [None] * cache.num_layers

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k.detach().float(), v.detach().float()
        self.cache.write(layer, slots, k, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.layer(layer)


@torch.inference_mode()
def calibrate(runner: Any) -> dict[str, Any]:
    """K mean and amaxes per layer and per (layer, KV head), exactly as
    `calibrate_kv_scales` measures them (same text, tokens, cache, backend)."""
    from dendrite.attention.base import build_attention_metadata
    from dendrite.attention.reference import ReferenceBackend
    from dendrite.model.kv_cache import KVCache
    from dendrite.model.kv_calibration import CALIBRATION_TEXT

    model, tok, cfg, dev = runner.model, runner.tokenizer, runner.model.config, runner.device
    ids = [i for i in tok.encode(CALIBRATION_TEXT) if 0 <= i < cfg.vocab_size][:256]
    n, ps = len(ids), 16
    pages = -(-n // ps)
    rec = _Recorder(KVCache(cfg.num_layers, pages, ps, cfg.num_kv_heads, cfg.head_dim,
                            runner.dtype, dev))
    backend = ReferenceBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ps,
                               sliding_windows=cfg.sliding_windows)
    meta = build_attention_metadata(np.arange(n), np.arange(n), [0, n], [0, pages],
                                    np.arange(pages), [n - (pages - 1) * ps], page_size=ps,
                                    device=dev)
    backend.plan(meta)
    model(torch.tensor(ids, dtype=torch.int64, device=dev), meta, rec, backend)
    k, v = torch.stack(rec.k), torch.stack(rec.v)  # [L, n, Hkv, D]
    k_mean = k.mean(1)
    kc = k - k_mean[:, None]
    h = hadamard(k.shape[-1])
    return {"n": n, "k_mean": k_mean,
            "k_had_amax_layer": (kc @ h).abs().flatten(1).amax(1),
            "v_had_amax_layer": (v @ h).abs().flatten(1).amax(1),
            "k_amax_layer": kc.abs().flatten(1).amax(1), "v_amax_layer": v.abs().flatten(1).amax(1),
            "k_raw_amax_layer": k.abs().flatten(1).amax(1),
            "k_amax_head": kc.abs().amax(dim=(1, 3)), "v_amax_head": v.abs().amax(dim=(1, 3))}


# -- quantizers (x float32 [T, Hkv, D] -> dequantized float32) -------------------------------


def fp8_rt(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """e4m3 round trip at `scale` (a float, or a tensor broadcasting over x)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def fp8_token_head(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return fp8_rt(x, scale)


def int8_token_head(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (x / scale).round().clamp(-127, 127) * scale


def mantissa_rt(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to a float with `bits` explicit mantissa bits, unbounded exponent (half even)."""
    m, e = torch.frexp(x)  # x = m * 2^e, |m| in [0.5, 1)
    q = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(m * q) / q, e)


def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] (d a power of two; entries +-1/sqrt(d))."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == d, f"head_dim {d} is not a power of two"
    return h / math.sqrt(d)


def scale_for(amax: float, headroom: float = 4.0) -> float:
    from dendrite.model.kv_calibration import scale_for as sf

    return sf(amax, FP8_MAX, headroom)


def variants(cal: dict[str, Any]) -> dict[str, tuple[Callable, Callable, bool]]:
    """name -> (k round trip, v round trip, subtract the K mean); each takes (layer, x)."""
    kl, vl, kr = cal["k_amax_layer"].tolist(), cal["v_amax_layer"].tolist(), \
        cal["k_raw_amax_layer"].tolist()
    kh, vh = cal["k_amax_head"], cal["v_amax_head"]  # [L, Hkv]
    kh_pow2 = torch.tensor([[scale_for(a) for a in row] for row in kh.tolist()])
    vh_pow2 = torch.tensor([[scale_for(a) for a in row] for row in vh.tolist()])
    ident = lambda l, x: x
    lay_k = lambda l, x: fp8_rt(x, scale_for(kl[l]))
    lay_v = lambda l, x: fp8_rt(x, scale_for(vl[l]))
    out: dict[str, tuple[Callable, Callable, bool]] = {
        "emu-identity": (ident, ident, False),
        "v1-layer-pow2": (lay_k, lay_v, True),
        "v2-layer-exact": (lambda l, x: fp8_rt(x, kl[l] / FP8_MAX),
                           lambda l, x: fp8_rt(x, vl[l] / FP8_MAX), True),
        "v3-head-pow2": (lambda l, x: fp8_rt(x, kh_pow2[l][:, None]),
                         lambda l, x: fp8_rt(x, vh_pow2[l][:, None]), True),
        "v3-head-exact": (lambda l, x: fp8_rt(x, (kh[l] / FP8_MAX)[:, None]),
                          lambda l, x: fp8_rt(x, (vh[l] / FP8_MAX)[:, None]), True),
        "v4-token-head": (lambda l, x: fp8_token_head(x), lambda l, x: fp8_token_head(x), True),
        "v5-nomean": (lambda l, x: fp8_rt(x, scale_for(kr[l])), lay_v, False),
        "k-only": (lay_k, ident, True),
        "v-only": (ident, lay_v, True),
        "int8-token-head": (lambda l, x: int8_token_head(x), lambda l, x: int8_token_head(x),
                            True),
    }
    # Rotation, not scale: K (less its mean) and V stored as x @ H (H orthonormal
    # Hadamard); a reader would rotate q by H and the output by H^T (exact math).
    # Stored here rotated back, x' = rt(x @ H) @ H^T.
    had = hadamard(cal["k_mean"].shape[-1])
    khl, vhl = cal["k_had_amax_layer"].tolist(), cal["v_had_amax_layer"].tolist()
    had_k = lambda l, x: fp8_rt(x @ had, scale_for(khl[l])) @ had.T
    had_v = lambda l, x: fp8_rt(x @ had, scale_for(vhl[l])) @ had.T
    out["had-k"] = (had_k, lay_v, True)
    out["had-kv"] = (had_k, had_v, True)
    for bits in (3, 4, 5):
        out[f"m{bits}-ideal"] = (lambda l, x, b=bits: mantissa_rt(x, b),
                                 lambda l, x, b=bits: mantissa_rt(x, b), True)
    return out


def install(runner: Any, k_rt: Callable, v_rt: Callable, k_mean: torch.Tensor | None,
            counts: list[int]) -> None:
    """Swap the runner's (bf16) pool for a float32 one whose writes go through the round trips."""
    cache = runner.kv_cache
    assert not cache.quantized and cache.kv.dtype == runner.dtype
    cache.kv = torch.zeros(cache.kv.shape, dtype=torch.float32, device=cache.kv.device)
    hkv, d = cache.num_kv_heads, cache.head_dim

    def write(self: Any, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k = k.float()  # (the bf16 K the model wrote, as the FP8 writer sees it)
        if k_mean is not None:
            k = k - k_mean[layer]
        k_cache, v_cache = self.layer(layer)
        k_cache.view(-1, hkv, d)[slots] = k_rt(layer, k)
        v_cache.view(-1, hkv, d)[slots] = v_rt(layer, v.float())
        counts[0] += slots.numel()

    cache.write = types.MethodType(write, cache)


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--no-engine-fp8", action="store_true", help="skip the real fp8kv engine row")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    from dendrite.model.loader import load_config

    torch.manual_seed(0)
    model_dir = bc.resolve_model(a.model)
    cfg = load_config(model_dir)
    # (bf16 on the CPU: the emulation is torch-only; a faithful proxy of the H100)
    wins, engine = bq.cpu_study_setup(model_dir, a.tokens, a.window)

    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()},
                           "scored": sum(len(w) - 1 for w in wins), "rows": []}

    def save() -> None:
        a.out.write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    e = engine()
    cal = calibrate(e.runner)
    with torch.inference_mode():
        ref = bq.score(e, wins)
    e.close()
    ref_ppl = bq.ppl_of(ref["lps"])
    bc.log(f"bf16 ppl {ref_ppl:.4f} ({time.perf_counter() - t0:.0f} s, {res['scored']} scored)")
    res["ref_ppl"] = ref_ppl
    res["calibration"] = {k: v.tolist() for k, v in cal.items() if k not in ("k_mean", "n")}

    def row(name: str, s: dict[str, list]) -> None:
        ag = bq.agreement(ref["top"], s["top"], 0.1)
        r = {"variant": name, "ppl": bq.ppl_of(s["lps"]),
             "ppl_delta_pct": 100.0 * (bq.ppl_of(s["lps"]) / ref_ppl - 1.0),
             "top1_all_pct": ag["top1_agree_all_pct"],
             "by_margin": {m: ag["by_margin"][str(m)] for m in MARGINS},
             "mean_abs_dlogprob": float(np.mean(np.abs(np.array(s["lps"]) -
                                                       np.array(ref["lps"]))))}
        res["rows"].append(r)
        save()
        bm = "  ".join(f">{m}: {r['by_margin'][m][1]:.2f}% ({r['by_margin'][m][0]})"
                       for m in MARGINS)
        bc.log(f"{name}: ppl {r['ppl']:.4f} ({r['ppl_delta_pct']:+.3f}%)  {bm}  "
               f"|dlp| {r['mean_abs_dlogprob']:.4f}")

    if not a.no_engine_fp8:
        e = engine(kv_dtype="fp8_e4m3")
        ec = e.runner.kv_scale_calibration
        mine = [scale_for(x) for x in cal["k_amax_layer"].tolist()]
        assert ec.k_scales == mine, (ec.k_scales, mine)  # the study calibrates as the engine
        assert torch.equal(ec.k_mean.cpu(), cal["k_mean"])
        with torch.inference_mode():
            row("fp8kv-engine", bq.score(e, wins))
        e.close()

    vs = variants(cal)
    names = a.variants.split(",") if a.variants else list(vs)
    for name in names:
        k_rt, v_rt, sub = vs[name]
        e = engine()
        counts = [0]
        install(e.runner, k_rt, v_rt, cal["k_mean"] if sub else None, counts)
        with torch.inference_mode():
            s = bq.score(e, wins)
        # every token of every window, in every layer, went through the hook
        assert counts[0] == cfg.num_layers * sum(len(w) - 1 for w in wins), counts
        e.close()
        row(name, s)

    hdr = ["variant", "ppl Δ %", *[f"top-1 % gap>{m}" for m in MARGINS], "top-1 % all",
           "mean |Δlogprob|"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in res["rows"]:
        lines.append("| " + " | ".join([r["variant"], f"{r['ppl_delta_pct']:+.3f}",
                                       *[f"{r['by_margin'][m][1]:.2f} ({r['by_margin'][m][0]})"
                                         for m in MARGINS],
                                       f"{r['top1_all_pct']:.2f}",
                                       f"{r['mean_abs_dlogprob']:.4f}"]) + " |")
    md = "\n".join(lines)
    a.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    save()


if __name__ == "__main__":
    main()

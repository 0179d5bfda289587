"""Kernel-level measurements behind the single-stream decode step (GPU only).

    python3 benchmarks/bench_kernels_gpu.py [--out DIR] [--sections bw,skinny,attn,tree,prefill]
                                            [--tree-sweep]

Sections, each printing a table (and all of them saved to kernels.json):

* bw      device copy bandwidth (read + write) and read bandwidth (a sum);
* skinny  the weight matmuls of one decode token of a Llama-3.2-1B-shaped
          model (hidden 2048, 16 layers, 32/8 heads x 64, MLP 8192, vocab
          128256): cuBLAS (`F.linear`) against Dendrite's Triton GEMV
          (dendrite/kernels/gemv.py), per shape over a sweep of tiles, then the whole token's
          sequence of 65 matmuls; weights are rotated through enough copies
          that L2 never holds them (as in a real step);
* rows    the same matmuls for 16 (and 4) rows, as in a 16-branch decode step:
          cuBLAS (+ the row kernels for RMSNorm, residual add and SiLU*up)
          against the fused few-row kernel (dendrite/kernels/skinny.py), per
          shape over a sweep of tiles, then a whole token's layers;
* fp8rows the fused 16-row cases on FP8 (128 x 128 block-scaled e4m3) weights,
          default tile vs a sweep (`FP8_ROW_TILES`), then 16 layers' matmuls
          projection by projection vs fused (default and best tiles) vs bf16;
* attn    FlashInfer paged decode in CUDA-graph mode for B=1 at 256/1K/4K
          tokens and B=16 over a shared 4K prefix: CUDA-core kernel (split
          KV + merge, what the engine captures) vs tensor-core kernel with and
          without split KV;
* tree    decode attention of B leaves over a shared prefix (plus a few own
          tokens each), per layer: FlashInfer flat decode (CUDA-core, split
          KV), FlashInfer's two-level cascade as the engine captures it
          (`GraphCascadeWrapper`), and Dendrite's TreeAttention (one split-KV
          pass over both levels + a merge), first over a sweep of its tiles;
* prefill FlashInfer paged prefill of long single sequences, fa3 and fa2, each
          case in its own process under CUDA_LAUNCH_BLOCKING=1, to locate the
          illegal memory access seen with 8192-token chunks.

Times are CUDA-graph replays (no launch overhead), medians over repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, LAYERS, HQ, HKV, HEAD_DIM, INTER, VOCAB = 2048, 16, 32, 8, 64, 8192, 128256
PAGE = 16
SHAPES = {  # name -> (N, K) of nn.Linear weights, one layer (lm_head once)
    "qkv": ((HQ + 2 * HKV) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HQ * HEAD_DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}
L2_FLUSH_BYTES = 256 << 20


def graph_time(fn, inner: int = 10, reps: int = 30) -> float:
    """Median seconds per `fn()` call, from CUDA-graph replays of `inner` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(ts)


def sec_bw(res: dict) -> None:
    n = 2 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = graph_time(lambda: y.copy_(x), inner=3, reps=10)
    xb = x.view(torch.bfloat16)
    out = torch.empty((), dtype=torch.float32, device="cuda")
    tr = graph_time(lambda: torch.sum(xb, dim=0, dtype=torch.float32, out=out), inner=3, reps=10)
    res["bw"] = {"copy_TBps": 2 * n / t / 1e12, "read_TBps": n / tr / 1e12}
    print(f"copy {res['bw']['copy_TBps']:.2f} TB/s (read+write), read {res['bw']['read_TBps']:.2f} TB/s")
    del x, y


def _weights(n: int, k: int, copies: int) -> list[torch.Tensor]:
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def _rotating(op, ws: list[torch.Tensor], x: torch.Tensor):
    i = [0]

    def fn():
        op(x, ws[i[0] % len(ws)])
        i[0] += 1
    return fn


def sec_skinny(res: dict) -> None:
    from dendrite.kernels.gemv import _launch, tile_for

    def ours(x, w, tile=None):
        return _launch(x, w, None, None, 0.0, False, None, tile)

    out = res.setdefault("skinny", {})
    print("\n| shape (N x K) | MB | cuBLAS us | GB/s | GEMV (default tile) us | GB/s | "
          "best tile (BN, warps) | us | GB/s |")
    print("|---|--:|--:|--:|--:|--:|---|--:|--:|")
    for name, (n, k) in SHAPES.items():
        nbytes = 2 * n * k
        copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
        ws = _weights(n, k, copies)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0].float())
        err = float((ours(x, ws[0]).float() - ref).abs().max() / ref.abs().max())
        ic = graph_time(_rotating(lambda x, w: F.linear(x, w), ws, x), inner=copies)
        td = graph_time(_rotating(ours, ws, x), inner=copies)
        default = tile_for(n, k)
        best = (td, default[0], default[2])
        for bn in (1, 2, 4, 8):
            for warps in (4, 8):
                tile = (bn, default[1], warps)
                try:
                    t = graph_time(_rotating(lambda x, w, tile=tile: ours(x, w, tile), ws, x),
                                   inner=copies, reps=15)
                except Exception as e:  # noqa: BLE001 (a tile that does not compile)
                    print(f"  tile {tile}: {type(e).__name__}")
                    continue
                if t < best[0]:
                    best = (t, bn, warps)
        gbs = lambda t: nbytes / t / 1e9  # noqa: E731
        out[name] = {"n": n, "k": k, "cublas_us": ic * 1e6, "gemv_us": td * 1e6,
                     "best_us": best[0] * 1e6, "best_bn": best[1], "best_warps": best[2],
                     "relerr": err, "default_tile": default}
        print(f"| {name} {n}x{k} | {nbytes / 1e6:.1f} | {ic * 1e6:.1f} | {gbs(ic):.0f} | "
              f"{td * 1e6:.1f} | {gbs(td):.0f} | ({best[1]}, {best[2]}) | {best[0] * 1e6:.1f} | "
              f"{gbs(best[0]):.0f} |")
        del ws
        torch.cuda.empty_cache()
    # The fused variants: RMSNorm prologue (qkv, gate_up), SiLU*up prologue (down).
    print("\n| fused variant | default tile | us | best tile (BN, warps) | us |")
    print("|---|---|--:|---|--:|")
    for name, mode in (("qkv", "norm"), ("gate_up", "norm"), ("down", "glu")):
        n, k = SHAPES[name]
        copies = max(2, -(-L2_FLUSH_BYTES // (2 * n * k)))
        ws = _weights(n, k, copies)
        xin = torch.randn(1, 2 * k if mode == "glu" else k, device="cuda", dtype=torch.bfloat16)
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16) if mode == "norm" else None

        def fused(x, w, tile=None, nw=nw, mode=mode):
            return _launch(x, w, None, nw, 1e-5, mode == "glu", None, tile)
        default = tile_for(n, k, mode == "norm", mode == "glu")
        td = graph_time(_rotating(fused, ws, xin), inner=copies)
        best = (td, default[0], default[2])
        for bn in (1, 2, 4, 8, 16, 32):
            for warps in (4, 8):
                tile = (bn, default[1], warps)
                try:
                    t = graph_time(_rotating(lambda x, w, tile=tile: fused(x, w, tile), ws, xin),
                                   inner=copies, reps=15)
                except Exception as e:  # noqa: BLE001
                    print(f"  tile {tile}: {type(e).__name__}")
                    continue
                if t < best[0]:
                    best = (t, bn, warps)
        out[f"{name}_{mode}"] = {"default_tile": default, "default_us": td * 1e6,
                                 "best_us": best[0] * 1e6, "best_bn": best[1],
                                 "best_warps": best[2]}
        print(f"| {name} +{mode} | {default} | {td * 1e6:.1f} | ({best[1]}, {best[2]}) | "
              f"{best[0] * 1e6:.1f} |")
        del ws
        torch.cuda.empty_cache()

    # One decode token's matmuls in model order, every layer its own weights.
    layers = [{nm: _weights(*SHAPES[nm], 1)[0] for nm in ("qkv", "o", "gate_up", "down")}
              for _ in range(LAYERS)]
    head = _weights(*SHAPES["lm_head"], 1)[0]
    total_bytes = sum(w.numel() * 2 for lw in layers for w in lw.values()) + head.numel() * 2
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(1, INTER, device="cuda", dtype=torch.bfloat16)

    def token(op):
        def fn():
            for lw in layers:
                op(x, lw["qkv"])
                op(x, lw["o"])
                op(x, lw["gate_up"])
                op(xi, lw["down"])
            op(x, head)
        return fn
    tc = graph_time(token(lambda x, w: F.linear(x, w)), inner=2, reps=20)
    ts = graph_time(token(ours), inner=2, reps=20)
    out["token"] = {"bytes": total_bytes, "cublas_ms": tc * 1e3, "gemv_ms": ts * 1e3}
    print(f"\nwhole token ({total_bytes / 1e9:.3f} GB of weights): cuBLAS {tc * 1e3:.3f} ms "
          f"({total_bytes / tc / 1e12:.2f} TB/s), GEMV {ts * 1e3:.3f} ms "
          f"({total_bytes / ts / 1e12:.2f} TB/s)")


# (BLOCK_N, BLOCK_K, warps, stages, split-K, swap: W x^T on the MMA)
ROW_TILES = [(16, 256, 4, 4, 1, 0), (32, 256, 4, 4, 1, 0), (64, 128, 4, 3, 1, 0),
             (64, 256, 4, 4, 1, 0), (16, 128, 4, 3, 4, 0), (32, 128, 4, 3, 4, 0)] + [
    (bn, bk, w, st, sp, 1) for bn, bk, w, st, sp in (
        (64, 128, 4, 3, 1), (64, 256, 4, 3, 1), (64, 64, 4, 4, 1), (128, 128, 4, 3, 1),
        (64, 128, 4, 4, 2), (64, 128, 4, 3, 4), (64, 128, 8, 3, 1), (128, 64, 4, 4, 1),
        (64, 256, 4, 2, 2))]


def _sweep(op, ws: list, x: torch.Tensor, copies: int, tiles: list, best: tuple) -> tuple:
    """(seconds, tile) of the fastest of `tiles` for `op(x, w, tile)` over the
    rotated weights, starting from `best` (the default tile's time and tile)."""
    for tile in tiles:
        try:
            t = graph_time(_rotating(lambda x, w, tile=tile: op(x, w, tile), ws, x),
                           inner=copies, reps=15)
        except Exception as e:  # noqa: BLE001 (a tile that does not compile)
            print(f"  tile {tile}: {type(e).__name__}")
            continue
        if t < best[0]:
            best = (t, tile)
    return best


def sec_rows(res: dict) -> None:
    from dendrite.kernels.rows import add_rms_norm, silu_mul
    from dendrite.kernels.skinny import _launch, tile_for

    out = res.setdefault("rows", {})
    nw_h = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    # (name, weight shape key, x width, norm?, glu_out?, residual?)
    cases = [("qkv", "qkv", HIDDEN, False, False, False), ("o", "o", HIDDEN, False, False, False),
             ("gate_up", "gate_up", HIDDEN, False, False, False),
             ("down", "down", INTER, False, False, False),
             ("lm_head", "lm_head", HIDDEN, False, False, False),
             ("qkv+norm", "qkv", HIDDEN, True, False, False),
             ("o+residual", "o", HIDDEN, False, False, True),
             ("gate_up+norm+silu", "gate_up", HIDDEN, True, True, False),
             ("down+residual", "down", INTER, False, False, True)]
    for m in (16, 4):
        print(f"\n{m} rows: | case | MB | cuBLAS (+row kernels) us | GB/s | few-row default "
              "(BN, BK, warps, stages, split, swap) us | GB/s | best tile | us | GB/s |")
        print("|---|--:|--:|--:|--:|--:|---|--:|--:|")
        for name, key, width, norm, glu, resid in cases:
            n, k = SHAPES[key]
            nbytes = 2 * n * k
            copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
            ws = _weights(n, k, copies)
            x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
            r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            nw = nw_h if norm else None

            def ref(x, w):
                h = add_rms_norm(x, None, nw_h, 1e-5)[0] if norm else x
                y = F.linear(h, w)
                if glu:
                    y = silu_mul(y)
                return y + r if resid else y

            def ours(x, w, tile=None):
                return _launch(x, w, None, nw, 1e-5, glu, r if resid else None, tile)
            err = float((ours(x, ws[0]).float() - ref(x, ws[0]).float()).abs().max()
                        / ref(x, ws[0]).float().abs().max())
            tc = graph_time(_rotating(ref, ws, x), inner=copies)
            default = tile_for(n // 2 if glu else n, k, norm, glu)
            td = graph_time(_rotating(ours, ws, x), inner=copies)
            best = (td, default)
            if m == 16:
                best = _sweep(ours, ws, x, copies, ROW_TILES, best)
            gbs = lambda t: nbytes / t / 1e9  # noqa: E731
            out[f"{m}:{name}"] = {"n": n, "k": k, "cublas_us": tc * 1e6, "few_us": td * 1e6,
                                  "default_tile": default, "best_us": best[0] * 1e6,
                                  "best_tile": best[1], "relerr": err}
            print(f"| {name} {n}x{k} | {nbytes / 1e6:.1f} | {tc * 1e6:.1f} | {gbs(tc):.0f} | "
                  f"{default} {td * 1e6:.1f} | {gbs(td):.0f} | {best[1]} | {best[0] * 1e6:.1f} | "
                  f"{gbs(best[0]):.0f} | relerr {err:.1e}")
            del ws
            torch.cuda.empty_cache()

    # A whole token's layers for 16 rows, in model order, every layer its own weights.
    layers = [{nm: _weights(*SHAPES[nm], 1)[0] for nm in ("qkv", "o", "gate_up", "down")}
              for _ in range(LAYERS)]
    head = _weights(*SHAPES["lm_head"], 1)[0]
    h0 = torch.randn(16, HIDDEN, device="cuda", dtype=torch.bfloat16)
    attn = torch.randn(16, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def unfused():
        h, res_ = h0, None
        for lw in layers:
            x, res_ = add_rms_norm(h, res_, nw_h, 1e-5)
            F.linear(x, lw["qkv"])
            h = F.linear(attn, lw["o"])
            x, res_ = add_rms_norm(h, res_, nw_h, 1e-5)
            h = F.linear(silu_mul(F.linear(x, lw["gate_up"])), lw["down"])
        F.linear(add_rms_norm(h, res_, nw_h, 1e-5)[0], head)

    def fused():
        h = h0
        for lw in layers:
            _launch(h, lw["qkv"], None, nw_h, 1e-5, False, None)
            h = _launch(attn, lw["o"], None, None, 0.0, False, h)
            act = _launch(h, lw["gate_up"], None, nw_h, 1e-5, True, None)
            h = _launch(act, lw["down"], None, None, 0.0, False, h)
        _launch(add_rms_norm(h, None, nw_h, 1e-5)[0], head, None, None, 0.0, False, None)
    tu = graph_time(unfused, inner=2, reps=20)
    tf = graph_time(fused, inner=2, reps=20)
    out["token16"] = {"cublas_rows_ms": tu * 1e3, "few_row_ms": tf * 1e3}
    print(f"\nwhole token, 16 rows: cuBLAS + row kernels {tu * 1e3:.3f} ms, "
          f"few-row fused {tf * 1e3:.3f} ms")


#: Few-row tiles tried on e4m3 weights: BLOCK_K is 128 (a chunk must lie in one
#: 128-column scale block), so a stage moves a quarter of a bf16 256-chunk's
#: bytes: wider BLOCK_N, more stages or split K keep the loads in flight.
FP8_ROW_TILES = [(bn, 128, w, st, sp, sw) for bn, w, st, sp, sw in (
    (16, 4, 4, 1, 0), (16, 4, 6, 1, 0), (16, 4, 4, 2, 0),
    (32, 4, 4, 1, 0), (32, 4, 6, 1, 0), (32, 4, 4, 2, 0), (32, 4, 4, 4, 0), (32, 8, 4, 1, 0),
    (64, 4, 4, 1, 0), (64, 4, 4, 2, 0), (64, 8, 4, 1, 0), (64, 4, 6, 1, 0),
    (64, 4, 4, 1, 1), (64, 8, 4, 1, 1), (64, 4, 4, 2, 1), (64, 8, 4, 2, 1), (64, 4, 6, 1, 1),
    (64, 8, 3, 1, 1), (128, 8, 3, 1, 1), (128, 8, 4, 1, 1), (128, 8, 3, 2, 1),
    (128, 8, 4, 1, 0))]


def sec_fp8rows(res: dict) -> None:
    """The `rows` section on FP8 (128 x 128 block-scaled e4m3) weights at 16 rows:
    each fused case with the default tile and over FP8_ROW_TILES, the bf16
    default beside it; then a whole token's layers: e4m3 projection by
    projection with the row kernels between them (the model's FP8 path),
    e4m3 fused with the default tiles and with each case's best, bf16 fused."""
    from dendrite.kernels.rows import add_rms_norm, silu_mul
    from dendrite.kernels.skinny import _launch, tile_for
    from dendrite.quant.formats import quantize

    out = res.setdefault("fp8rows", {})
    m = 16
    nw_h = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    # (name, weight key, x width, norm?, glu_out?, residual?)
    cases = [("qkv+norm", "qkv", HIDDEN, True, False, False),
             ("o+residual", "o", HIDDEN, False, False, True),
             ("gate_up+norm+silu", "gate_up", HIDDEN, True, True, False),
             ("down+residual", "down", INTER, False, False, True),
             ("gate_up (plain)", "gate_up", HIDDEN, False, False, False)]
    best_tiles: dict[str, tuple] = {}
    print("\n16 rows, e4m3 weights: | case | fp8 MB | bf16 fused us | fp8 default tile us | "
          "GB/s | best tile | us | GB/s |")
    print("|---|--:|--:|---|--:|---|--:|--:|")
    for name, key, width, norm, glu, resid in cases:
        n, k = SHAPES[key]
        nbytes = n * k
        copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
        dense = _weights(n, k, copies)
        qws = [quantize(w, "fp8") for w in dense]
        x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(m, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
        nw = nw_h if norm else None

        def ours(x, q, tile=None):
            return _launch(x, q.data, None, nw, 1e-5, glu, r if resid else None, tile,
                           q.scale, q.block)

        def dense_op(x, w):
            return _launch(x, w, None, nw, 1e-5, glu, r if resid else None)
        tb = graph_time(_rotating(dense_op, dense, x), inner=copies)
        del dense
        default = tile_for(n // 2 if glu else n, k, norm, glu)
        td = graph_time(_rotating(ours, qws, x), inner=copies)
        best = _sweep(ours, qws, x, copies, FP8_ROW_TILES, (td, default))
        best_tiles[name] = best[1]
        gbs = lambda t: nbytes / t / 1e9  # noqa: E731
        out[name] = {"n": n, "k": k, "bf16_us": tb * 1e6, "default_tile": default,
                     "default_us": td * 1e6, "best_tile": best[1], "best_us": best[0] * 1e6}
        print(f"| {name} {n}x{k} | {nbytes / 1e6:.1f} | {tb * 1e6:.1f} | {default} "
              f"{td * 1e6:.1f} | {gbs(td):.0f} | {best[1]} | {best[0] * 1e6:.1f} | "
              f"{gbs(best[0]):.0f} |")
        del qws
        torch.cuda.empty_cache()

    dense_layers = [{nm: _weights(*SHAPES[nm], 1)[0] for nm in ("qkv", "o", "gate_up", "down")}
                    for _ in range(LAYERS)]
    layers = [{nm: quantize(w, "fp8") for nm, w in lw.items()} for lw in dense_layers]
    h0 = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
    attn = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def q8(x, q, tile=None, nw=None, glu=False, resid=None):
        return _launch(x, q.data, None, nw, 1e-5, glu, resid, tile, q.scale, q.block)

    def by_projection():
        h, res_ = h0, None
        for lw in layers:
            x, res_ = add_rms_norm(h, res_, nw_h, 1e-5)
            q8(x, lw["qkv"])
            h = q8(attn, lw["o"])
            x, res_ = add_rms_norm(h, res_, nw_h, 1e-5)
            h = q8(silu_mul(q8(x, lw["gate_up"])), lw["down"])

    def fused(tiles):
        def run():
            h = h0
            for lw in layers:
                q8(h, lw["qkv"], tiles.get("qkv+norm"), nw=nw_h)
                h = q8(attn, lw["o"], tiles.get("o+residual"), resid=h)
                act = q8(h, lw["gate_up"], tiles.get("gate_up+norm+silu"), nw=nw_h, glu=True)
                h = q8(act, lw["down"], tiles.get("down+residual"), resid=h)
        return run

    def bf16_fused():
        h = h0
        for lw in dense_layers:
            _launch(h, lw["qkv"], None, nw_h, 1e-5, False, None)
            h = _launch(attn, lw["o"], None, None, 0.0, False, h)
            act = _launch(h, lw["gate_up"], None, nw_h, 1e-5, True, None)
            h = _launch(act, lw["down"], None, None, 0.0, False, h)
    best_proj = dict(best_tiles)
    times = {"fp8 by projection (default tiles)": graph_time(by_projection, inner=2, reps=20),
             "fp8 fused (default tiles)": graph_time(fused({}), inner=2, reps=20),
             "fp8 fused (best tiles)": graph_time(fused(best_proj), inner=2, reps=20),
             "bf16 fused": graph_time(bf16_fused, inner=2, reps=20)}
    out["layers16"] = {k: v * 1e3 for k, v in times.items()}
    print(f"\n{LAYERS} layers' matmuls, 16 rows (no head, no attention):")
    for k, v in times.items():
        print(f"  {k}: {v * 1e3:.3f} ms")


def sec_attn(res: dict) -> None:
    import flashinfer

    out = res.setdefault("attn", {})
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    print("\n| batch | kv len | shared | CUDA-core graph us | tensor-core split us | "
          "tensor-core no-split us |")
    print("|--:|--:|---|--:|--:|--:|")
    for b, kv_len, shared in ((1, 256, False), (1, 1024, False), (1, 4096, False),
                              (16, 4096, True), (16, 256, False)):
        pages_per = -(-kv_len // PAGE)
        total_pages = pages_per if shared else b * pages_per
        kvs = [(torch.randn(total_pages + 1, PAGE, HKV, HEAD_DIM, device="cuda",
                            dtype=torch.bfloat16),
                torch.randn(total_pages + 1, PAGE, HKV, HEAD_DIM, device="cuda",
                            dtype=torch.bfloat16)) for _ in range(LAYERS)]
        if shared:
            indices = torch.arange(pages_per, dtype=torch.int32).repeat(b)
        else:
            indices = torch.arange(b * pages_per, dtype=torch.int32)
        indptr = torch.arange(b + 1, dtype=torch.int32) * pages_per
        last = torch.full((b,), kv_len - (pages_per - 1) * PAGE, dtype=torch.int32)
        q = torch.randn(b, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        row = {}
        for label, tc, nosplit in (("cuda_core", False, False), ("tc_split", True, False),
                                   ("tc_nosplit", True, True)):
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_cuda_graph=True, use_tensor_cores=tc,
                    paged_kv_indptr_buffer=indptr.cuda(),
                    paged_kv_indices_buffer=indices.cuda(),
                    paged_kv_last_page_len_buffer=last.cuda())
                kw = {"disable_split_kv": True} if nosplit else {}
                w.plan(indptr, indices.cuda(), last, HQ, HKV, HEAD_DIM, PAGE,
                       q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, **kw)
                li = [0]

                def fn(w=w, li=li):
                    w.run(q, kvs[li[0] % LAYERS])
                    li[0] += 1
                row[label] = graph_time(fn, inner=LAYERS) * 1e6
            except Exception as e:  # noqa: BLE001
                row[label] = None
                print(f"  {label} B={b} kv={kv_len}: {type(e).__name__}: {str(e)[:200]}")
        out[f"b{b}_kv{kv_len}{'_shared' if shared else ''}"] = row
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {b} | {kv_len} | {shared} | {f(row.get('cuda_core'))} | "
              f"{f(row.get('tc_split'))} | {f(row.get('tc_nosplit'))} |")
        del kvs
        torch.cuda.empty_cache()


def sec_tree(res: dict, sweep_tiles: bool = False) -> None:
    import numpy as np

    from dendrite.attention.cascade import split_levels
    from dendrite.attention.flashinfer_backend import (
        FlashInferBackend,
        GraphCascadeWrapper,
        GraphDecodeWrapper,
    )
    from dendrite.kernels.tree_attention import TreeAttention

    out = res.setdefault("tree", {})
    fib = FlashInferBackend(HQ, HKV, HEAD_DIM, PAGE, dtype=torch.bfloat16, device="cuda")

    def case(b: int, shared: int, own: int):
        """Page tables of b leaves: `shared` common tokens (whole pages), then
        `own` more each (its last page partly filled); one KV pool per layer."""
        sp = shared // PAGE
        own_pages = -(-own // PAGE) if shared else -(-(shared + own) // PAGE)
        rows = [list(range(sp)) + list(range(sp + i * own_pages, sp + (i + 1) * own_pages))
                for i in range(b)]
        indptr = np.zeros(b + 1, dtype=np.int32)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.concatenate(rows).astype(np.int32)
        last = np.full(b, own - (own_pages - 1) * PAGE if own % PAGE else PAGE, dtype=np.int32)
        pages = sp + b * own_pages + 1
        kvs = [torch.randn(2, pages, PAGE, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(LAYERS)]
        q = torch.randn(b, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        return indptr, indices, last, sp, kvs, q

    def per_layer(run, kvs) -> float:
        li = [0]

        def fn():
            kv = kvs[li[0] % LAYERS]
            run(kv[0], kv[1])
            li[0] += 1
        return graph_time(fn, inner=LAYERS) * 1e6

    def tree_us(b, indptr, indices, last, sp, kvs, q, **kw) -> float:
        ta = TreeAttention(HQ, HKV, HEAD_DIM, PAGE, b, len(indices), "cuda", **kw)
        ta.plan(indptr, torch.from_numpy(indices).cuda(), last, sp)
        return per_layer(lambda k, v: ta.run(q, k, v), kvs)

    # Tile sweep on the shape and on one long sequence.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sweep = {}
    for b, shared, own in ((16, 4096, 40), (1, 0, 4096)) if sweep_tiles else ():
        indptr, indices, last, sp, kvs, q = case(b, shared, own)
        best = None
        print(f"\nTreeAttention tiles, B={b} shared={shared} own={own} (us per layer)")
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    for ips in (1.0, 2.0, 4.0):
                        for progs in (1, 2, 4):
                            kw = dict(block_n=bn, num_warps=warps, num_stages=stages,
                                      items_per_sm=ips, programs=progs * sms)
                            try:
                                t = tree_us(b, indptr, indices, last, sp, kvs, q, **kw)
                            except Exception as e:  # noqa: BLE001 (out of resources)
                                print(f"  {kw}: {type(e).__name__}")
                                continue
                            key = f"bn{bn}_w{warps}_s{stages}_i{ips}_p{progs}"
                            sweep.setdefault(f"b{b}", {})[key] = t
                            if best is None or t < best[0]:
                                best = (t, kw)
        print(f"  best {best[1]}: {best[0]:.2f} us")
        out[f"best_b{b}"] = {"us": best[0], **best[1]}
        del kvs
    if sweep_tiles:
        out["sweep"] = sweep
    print("\n| leaves | shared | own | FlashInfer flat us | FlashInfer cascade us | "
          "tree (default) us | tree (best of sweep at B=16) us |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    bk = {k: v for k, v in out.get("best_b16", {}).items() if k != "us"}
    for b, shared, own in ((1, 0, 4096), (1, 0, 1024), (2, 4096, 40), (4, 4096, 40),
                           (16, 4096, 40), (16, 4096, 400), (16, 1024, 40), (16, 256, 40),
                           (64, 1024, 40), (4, 16384, 40), (32, 4096, 40)):
        indptr, indices, last, sp, kvs, q = case(b, shared, own)
        row = {}
        gw = GraphDecodeWrapper(fib, b, len(indices) + b)
        gw.plan(torch.from_numpy(indptr), torch.from_numpy(indices).cuda(),
                torch.from_numpy(last))
        row["fi_flat"] = per_layer(lambda k, v: gw.run(q, k, v), kvs)
        if sp and b > 1:
            cw = GraphCascadeWrapper(fib, b, len(indices) + b)
            _, oi, ox = split_levels(indptr, indices, sp)
            cw.plan(torch.from_numpy(indices[:sp]).cuda(), torch.from_numpy(oi),
                    torch.from_numpy(ox), torch.from_numpy(last))
            row["fi_cascade"] = per_layer(lambda k, v: cw.run(q, k, v), kvs)
        row["tree"] = tree_us(b, indptr, indices, last, sp, kvs, q)
        row["tree_best"] = tree_us(b, indptr, indices, last, sp, kvs, q, **bk) if bk else None
        out[f"b{b}_s{shared}_o{own}"] = row
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"| {b} | {shared} | {own} | {f(row['fi_flat'])} | {f(row.get('fi_cascade'))} "
              f"| {f(row['tree'])} | {f(row.get('tree_best'))} |")
        del kvs
        torch.cuda.empty_cache()


def prefill_case(backend: str, qo: int, kv: int, pool_pages: int) -> None:
    """One paged prefill of a single sequence (the last `qo` of `kv` tokens are new)."""
    import flashinfer

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    pages = -(-kv // PAGE)
    k_cache = torch.randn(pool_pages, PAGE, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    indices = torch.randperm(pool_pages, dtype=torch.int32)[:pages].cuda()
    w.plan(torch.tensor([0, qo], dtype=torch.int32), torch.tensor([0, pages], dtype=torch.int32),
           indices, torch.tensor([kv - (pages - 1) * PAGE], dtype=torch.int32), HQ, HKV,
           HEAD_DIM, PAGE, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    q = torch.randn(qo, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    o = w.run(q, (k_cache, v_cache))
    torch.cuda.synchronize()
    print(f"OK backend={backend} qo={qo} kv={kv} out_finite={bool(torch.isfinite(o).all())}")


def sec_prefill(res: dict) -> None:
    out = res.setdefault("prefill", {})
    pool = (131072 + 16384) // PAGE
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for backend in ("fa3", "fa2"):
        for qo, kv in ((4096, 4096), (8192, 8192), (4096, 32768), (8192, 32768), (2048, 131072)):
            key = f"{backend}_q{qo}_kv{kv}"
            try:
                p = subprocess.run([sys.executable, __file__, "--prefill-case",
                                    f"{backend}:{qo}:{kv}:{pool}"], env=env, capture_output=True,
                                   text=True, timeout=240)
                text = (p.stdout + p.stderr).strip().splitlines()
                ok = p.returncode == 0 and any(t.startswith("OK") for t in text)
                msg = next((t for t in text if t.startswith("OK")), None) or \
                    " | ".join(t for t in text if "rror" in t)[-400:]
            except subprocess.TimeoutExpired:
                ok, msg = False, "timeout"
            out[key] = {"ok": ok, "msg": msg}
            print(f"prefill {key}: {'ok' if ok else 'FAILED'} {msg}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--sections", default="bw,skinny,rows,attn,prefill")
    ap.add_argument("--prefill-case", default=None)
    ap.add_argument("--tree-sweep", action="store_true",
                    help="tree section: sweep TreeAttention's tiles first (~1 min)")
    a = ap.parse_args()
    if a.prefill_case:
        b, qo, kv, pool = a.prefill_case.split(":")
        prefill_case(b, int(qo), int(kv), int(pool))
        return
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    fns = {"bw": sec_bw, "skinny": sec_skinny, "rows": sec_rows,
           "fp8rows": sec_fp8rows, "attn": sec_attn,
           "tree": lambda r: sec_tree(r, a.tree_sweep), "prefill": sec_prefill}
    for s in a.sections.split(","):
        try:
            fns[s](res)
        except Exception as e:  # noqa: BLE001 (report and go on with the next section)
            import traceback
            traceback.print_exc()
            res[s + "_error"] = f"{type(e).__name__}: {e}"[:500]
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "kernels.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

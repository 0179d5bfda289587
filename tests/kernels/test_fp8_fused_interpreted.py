"""The GEMV and few-row kernels on e4m3 weights with block scales, through
Triton's CPU interpreter, against float32 math on the dequantized weight.
(The few-row kernel's GPU compile of both MMA orientations is what
tests/kernels/test_fp8_matmul_gpu.py and the GPU runs check: the interpreter
accepts code that Triton's compiler refuses.)

Runs where Triton is installed (a subprocess, as triton_interpreter.py
explains): both scale paths of the GEMV (scales folded into x when a
program's rows share a row of blocks; per-row group sums for MXFP8's 1 x 32
and per-row fused blocks), the few-row kernel's scaled MMA chunks (plain,
SWAP, split K, the gate|up epilogue), with the fused RMSNorm, SiLU*up and
residual, on shapes that are not multiples of the blocks.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted

SCRIPT = r'''
import torch, torch.nn.functional as F
from dendrite.kernels import weight_scales
from dendrite.kernels.gemv import _launch as gemv_launch, tile_for as gemv_tile
from dendrite.kernels.skinny import _launch as skinny_launch
from dendrite.quant.formats import dequantize, quantize_fp8, quantize_mxfp8

dt = torch.float16
torch.manual_seed(0)

def close(got, ref, what):
    got, ref = got.float(), ref.float()
    tol = 4 * torch.finfo(dt).eps * ref.abs() + 2e-3 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), (what, int(bad.sum()), float((got - ref).abs().max()))

def rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

def weights(n, k):
    w = torch.randn(n, k) * k ** -0.5 * torch.exp(torch.rand(n, 1))
    yield "fp8 128x128", quantize_fp8(w)
    yield "fp8 per-row", quantize_fp8(w, (1, 128))
    yield "mxfp8", quantize_mxfp8(w)

cases = 0
modes = set()
for n, k in ((256, 256), (200, 96), (96, 320)):
    for name, q in weights(n, k):
        wf = dequantize(q, torch.float32)
        x = torch.randn(1, k).to(dt)
        b = torch.randn(n).to(dt)
        res = torch.randn(1, n).to(dt)
        nw = (1 + 0.1 * torch.randn(k)).to(dt)
        kw = dict(scale=q.scale, block=q.block)
        # A tile of 16 rows (folded scales where blocks are 128 rows) and one
        # of 2 rows x 64 columns (several chunks; group sums for per-row blocks).
        for tile in (None, (2, 64, 4)):
            bn, bk, _ = tile or gemv_tile(n, k, weight_bytes=1)
            modes.add(weight_scales.gemv_mode(n, k, q.block, bn, bk)[0])
            y = gemv_launch(x, q.data, b, None, 0.0, False, None, tile, **kw)
            close(y, x.float() @ wf.T + b.float(), (name, n, k, tile, "plain"))
            y = gemv_launch(x, q.data, None, nw, 1e-5, False, res, tile, **kw)
            ref = res.float() + (rms(x, nw, 1e-5).float() @ wf.T).to(dt).float()
            close(y, ref, (name, n, k, tile, "norm+residual"))
            gu = torch.randn(1, 2 * k).to(dt)
            y = gemv_launch(gu, q.data, None, None, 0.0, True, None, tile, **kw)
            gate, up = gu.split(k, dim=-1)
            close(y, (F.silu(gate) * up).float() @ wf.T, (name, n, k, tile, "glu"))
            cases += 3
        # Few rows: default tile, SWAP, split K over two programs.
        xs = torch.randn(5, k).to(dt)
        for tile in (None, (32, 32, 4, 2, 1, 1), (16, 32, 4, 2, 2, 0)):
            y = skinny_launch(xs, q.data, b, nw, 1e-5, False, None, tile, **kw)
            close(y, rms(xs, nw, 1e-5).float() @ wf.T + b.float(), (name, n, k, tile, "rows"))
            cases += 1
        if n % 2 == 0:
            y = skinny_launch(xs, q.data, None, None, 0.0, True, None, None, **kw)
            g_, u_ = (xs.float() @ wf.T).to(dt).split(n // 2, dim=-1)
            close(y, F.silu(g_) * u_, (name, n, k, "glu_out"))
            cases += 1
# The dense path (no scales) is unchanged by them.
w = torch.randn(96, 320).to(dt)
x = torch.randn(1, 320).to(dt)
close(gemv_launch(x, w, None, None, 0.0, False, None), x.float() @ w.float().T, "dense gemv")
close(skinny_launch(xs[:, :320], w, None, None, 0.0, False, None), xs.float() @ w.float().T,
      "dense rows")
cases += 2
assert modes == {1, 2}, modes
print("cases", cases)
'''


def test_scaled_gemv_and_few_row_kernels_match_dequantized_math():
    proc = run_interpreted(SCRIPT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cases 92" in proc.stdout, proc.stdout

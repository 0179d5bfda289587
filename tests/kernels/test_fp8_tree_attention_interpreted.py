"""The tree-attention kernels on FP8 pages through Triton's CPU interpreter,
against the float64 reference over the dequantized pages.

Runs where Triton is installed (a subprocess, as
test_tree_attention_interpreted.py explains). Only the FP8 *loads* are checked
here: the interpreter's float32 -> FP8 conversion does not round to nearest
(1.97 became 1.0), so the fused FP8 writer is checked on the GPU only
(tests/attention/test_fp8_kv_gpu.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted

SCRIPT = r'''
import numpy as np, torch
from dendrite.kernels.tree_attention import TreeAttention
from dendrite.model.kv_cache import dequantize, quantize
from tree_attention_case import random_tree, reference

rng = np.random.default_rng(0)
PAGE, NP = 16, 64
cases = 0
for hq, hkv, leaves, bucket, shared, ks, vs in (
        (8, 2, 3, 4, 3, 2.0 ** -2, 2.0 ** 3),  # GQA 4, a padding row, scaled K and V
        (4, 4, 2, 2, 0, 1.0, 1.0)):            # MHA, nothing shared, unit scales
    torch.manual_seed(cases)
    k = quantize(torch.randn(NP, PAGE, hkv, 64) * 2, ks)
    v = quantize(torch.randn(NP, PAGE, hkv, 64) * 30, vs)
    indptr, indices, last = random_tree(rng, NP, PAGE, leaves, shared, 3)
    q = torch.randn(bucket, hq, 64, dtype=torch.float16)
    ta = TreeAttention(hq, hkv, 64, PAGE, bucket, 256, "cpu", max_splits=16, programs=7,
                       dtype=torch.float16, block_n=16)
    ta.plan(indptr, indices, last, shared)
    out = ta.run(q, k, v, k_scale=ks, v_scale=vs)
    ref = reference(q[:leaves], dequantize(k, ks), dequantize(v, vs), indptr, indices, last)
    err = (out[:leaves].double() - ref).abs().max().item()
    # fp16 partial outputs: relative 2^-11 each, a few merged
    assert err < 4e-3 * ref.abs().max().item(), (cases, err, ref.abs().max().item())
    assert (out[leaves:] == 0).all()
    cases += 1
try:
    ta.run(q, k.view(torch.uint8), v.view(torch.uint8))
except ValueError as e:
    assert "float8_e4m3fn" in str(e)
    cases += 1
print("cases", cases)
'''


def test_fp8_pages_match_the_dequantized_reference_in_the_interpreter():
    proc = run_interpreted(SCRIPT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cases 3" in proc.stdout

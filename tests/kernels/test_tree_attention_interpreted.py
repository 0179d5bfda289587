"""The tree-attention kernels through Triton's CPU interpreter, against the float64 reference.

Runs where Triton is installed (it is not a dependency of the CPU install, so
CI may skip this; tests/kernels/test_tree_attention_gpu.py runs the compiled
kernels). The interpreter needs TRITON_INTERPRET=1 before Triton builds its
kernels, hence a subprocess.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted

SCRIPT = r'''
import numpy as np, torch
from dendrite.kernels.tree_attention import TreeAttention
from tree_attention_case import random_tree, reference

rng = np.random.default_rng(0)
PAGE, NP = 16, 96
cases = 0
for hq, hkv, leaves, bucket, shared, tile, block_n in (
        (8, 2, 3, 4, 5, None, 16),   # GQA 4, a padding row, 5 shared pages
        (8, 2, 3, 3, 0, None, 32),   # nothing shared: flat split-KV decode
        (4, 4, 5, 6, 3, 2, 16),      # MHA, three tiles of leaves over the prefix
        (6, 2, 2, 2, 2, None, 16)):  # GQA 3: rows that do not fill a power of two
    torch.manual_seed(cases)
    k = torch.randn(NP, PAGE, hkv, 64, dtype=torch.float16)
    v = torch.randn(NP, PAGE, hkv, 64, dtype=torch.float16)
    indptr, indices, last = random_tree(rng, NP, PAGE, leaves, shared, 3)
    q = torch.randn(bucket, hq, 64, dtype=torch.float16)
    ta = TreeAttention(hq, hkv, 64, PAGE, bucket, 256, "cpu", max_splits=16, programs=7,
                       dtype=torch.float16,
                       block_n=block_n, leaves_per_tile=tile)
    wp = ta.plan(indptr, indices, last, shared)
    out = ta.run(q, k, v)
    ref = reference(q[:leaves], k, v, indptr, indices, last)
    err = (out[:leaves].double() - ref).abs().max().item()
    assert err < 2e-3, (hq, hkv, leaves, shared, err)
    assert (out[leaves:] == 0).all()
    if shared:
        assert (wp.items[:, 1] > 1).any() or tile == 1
    cases += 1
print("cases", cases)
'''


def test_kernels_match_reference_in_the_interpreter():
    proc = run_interpreted(SCRIPT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cases 4" in proc.stdout

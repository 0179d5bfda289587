"""The N-bit KV kernels through Triton's CPU interpreter: decode attention against its
torch twin, the quantize-on-write kernel against `KVQuantFormat.quantize`.

Runs where Triton is installed (not a dependency of the CPU install, so CI may
skip it; tests/kernels/test_kv_quant_attention_gpu.py runs the compiled
kernel). The interpreter needs TRITON_INTERPRET=1 before Triton builds its
kernels, hence a subprocess.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted

SCRIPT = r'''
import torch
from dendrite.kernels.kv_quant_attention import decode_attention, decode_attention_torch
from dendrite.model.kv_quant import KVQuantFormat
from kv_quant_case import random_pages

cases = 0
for bits, d, group, hq, hkv, page, lens, splits in (
        (4, 64, None, 9, 3, 16, [1, 37, 100, 80], None),  # GQA 3 (SmolLM2), splits by heuristic
        (3, 64, 32, 8, 2, 16, [5, 70], 3),                # int3, two groups, 3 splits
        (4, 16, 8, 4, 2, 8, [9, 1, 24], 2),               # tiny head, page 8, a split with no tokens
        (3, 128, None, 4, 4, 16, [33], 1)):               # MHA, D 128
    fmt = KVQuantFormat(bits, d, group)
    q, k, v, indptr, indices, lens_t = random_pages(fmt, lens, hq, hkv, page, seed=cases)
    ref = decode_attention_torch(q, k, v, indptr, indices, lens_t, fmt, d**-0.5)
    for contiguous in ((True, False) if bits == 4 else (True,)):
        out = decode_attention(q, k, v, indptr, indices, lens_t, fmt, d**-0.5,
                               max_kv_len=max(lens), num_splits=splits, contiguous=contiguous)
        err = (out - ref).abs().max().item()
        assert err < 4e-3, (bits, d, group, contiguous, err)
    cases += 1

from dendrite.kernels.kv_quant_write import write_rows
from dendrite.model.kv_quant import rotation_matrix

for bits, d, group, hkv in ((4, 64, None, 3), (3, 64, 32, 2), (4, 16, 8, 2), (3, 128, None, 1)):
    fmt, m = KVQuantFormat(bits, d, group), rotation_matrix(d)
    g = torch.Generator().manual_seed(bits + d)
    x = torch.randn(37, hkv, d, generator=g) * 3
    slots = torch.randperm(8 * 16, generator=g)[:37]
    pages = torch.zeros(8, 16, hkv, fmt.row_bytes, dtype=torch.uint8)
    write_rows(x, slots, pages, m, fmt)
    flat = pages.view(-1, hkv, fmt.row_bytes)
    got, ref = flat[slots], fmt.quantize(x @ m)
    assert (got == ref).float().mean() > 0.99, (bits, d, group)
    step = fmt.scales(ref)[0].amax()
    assert (fmt.dequantize(got) - fmt.dequantize(ref)).abs().max() <= step * 1.01
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not flat[untouched].any()
    cases += 1
print("cases", cases)
'''


def test_kernels_interpreted_match_torch():
    proc = run_interpreted(SCRIPT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cases 8" in proc.stdout

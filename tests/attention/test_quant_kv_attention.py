"""Attention over N-bit KV pages (QuantKVBackend, torch path) against exact attention.

Two checks per case: the backend equals dense attention over the K/V the
pages decode to (the rotation algebra is exact: q rotated, output rotated
back), and stays within the quantization error of attention over the
original float K/V. Decode and prefill rows in one step, GQA, shuffled pages.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.attention.base import build_attention_metadata
from dendrite.attention.quant_kv import QuantKVBackend
from dendrite.kernels.kv_quant_attention import decode_attention_torch
from dendrite.model.kv_quant import KVQuantFormat
from dendrite.model.kv_quant_cache import QuantKVCache

HQ, HKV, D, PAGE = 8, 2, 64, 8


def dense(q, k, v, q_pos):
    g = HQ // HKV
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def make_step(fmt, kv_lens, q_lens, seed=0, num_pages=64):
    """A pool with random K/V of each sequence on shuffled pages and the step's metadata."""
    g = torch.Generator().manual_seed(seed)
    free = list(np.random.default_rng(seed).permutation(num_pages))
    pool = QuantKVCache(1, num_pages, PAGE, HKV, fmt, "cpu")
    seqs, pos, slots, qo, kvp, kvi, last = [], [], [], [0], [0], [], []
    for n, ql in zip(kv_lens, q_lens):
        pages = [int(free.pop()) for _ in range((n + PAGE - 1) // PAGE)]
        k = torch.randn(n, HKV, D, generator=g)
        v = torch.randn(n, HKV, D, generator=g)
        s = torch.tensor([pages[i // PAGE] * PAGE + i % PAGE for i in range(n)])
        pool.write(0, s, k, v)
        seqs.append((k, v, torch.randn(ql, HQ, D, generator=g), torch.arange(n - ql, n)))
        pos += list(range(n - ql, n))
        slots += s[n - ql:].tolist()
        qo.append(qo[-1] + ql)
        kvi += pages
        kvp.append(len(kvi))
        last.append(n - (len(pages) - 1) * PAGE)
    meta = build_attention_metadata(pos, slots, qo, kvp, kvi, last, page_size=PAGE)
    return pool, seqs, meta


def decoded(pool, k_or_v, slots):
    """What the pages hold for `slots`, un-rotated: [n, Hkv, D]."""
    cache = pool.layer(0)[k_or_v].reshape(-1, HKV, pool.fmt.row_bytes)
    return pool.fmt.dequantize(cache[slots]) @ pool.rotation.T


# Random unit-variance K/V: the output error is about 1.4x the per-vector error
# (0.09 at 4 bits, 0.19 at 3), K's and V's adding up.
@pytest.mark.parametrize("bits,bound", [(4, 0.16), (3, 0.36)])
@pytest.mark.parametrize("group", [None, 16])
def test_backend_vs_exact(bits, bound, group):
    fmt = KVQuantFormat(bits, D, group)
    kv_lens, q_lens = [1, 30, 57, 9, 40], [1, 1, 12, 9, 1]
    pool, seqs, meta = make_step(fmt, kv_lens, q_lens, seed=bits)
    be = QuantKVBackend(HQ, HKV, D, fmt, pool.rotation, PAGE, use_triton=False)
    be.plan(meta)
    q = torch.cat([s[2] for s in seqs])
    out = be.forward(0, q, *pool.layer(0))
    assert out.shape == q.shape and out.dtype == q.dtype
    starts = np.cumsum([0] + q_lens)
    kvp = meta.kv_indptr.tolist()
    errs = []
    for b, (k, v, qb, qpos) in enumerate(seqs):
        pages = meta.kv_indices[kvp[b]:kvp[b + 1]].long()
        slots = (pages[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)[: kv_lens[b]]
        ob = out[starts[b]:starts[b + 1]]
        on_pages = dense(qb, decoded(pool, 0, slots), decoded(pool, 1, slots), qpos)
        torch.testing.assert_close(ob, on_pages, atol=2e-5, rtol=1e-4)
        exact = dense(qb, k, v, qpos)
        errs.append(((ob - exact).norm() / exact.norm()).item())
    assert max(errs) < bound, errs


def test_torch_decode_twin_matches_backend():
    """The kernel's torch twin (what the GPU test compares the Triton kernel to)
    computes the backend's decode rows."""
    fmt = KVQuantFormat(4, D)
    kv_lens = [3, 64, 17]
    pool, seqs, meta = make_step(fmt, kv_lens, [1, 1, 1], seed=5)
    be = QuantKVBackend(HQ, HKV, D, fmt, pool.rotation, PAGE, use_triton=False)
    be.plan(meta)
    q = torch.cat([s[2] for s in seqs])
    out = be.forward(0, q, *pool.layer(0))
    twin = decode_attention_torch(q @ pool.rotation, *pool.layer(0), meta.kv_indptr,
                                  meta.kv_indices, meta.kv_lens, fmt, D**-0.5) @ pool.rotation.T
    torch.testing.assert_close(out, twin, atol=2e-5, rtol=1e-4)


def test_bf16_queries_and_bad_args():
    fmt = KVQuantFormat(4, D)
    pool, seqs, meta = make_step(fmt, [20], [1])
    be = QuantKVBackend(HQ, HKV, D, fmt, pool.rotation, PAGE)
    assert not be.use_triton  # CPU
    be.plan(meta)
    q = seqs[0][2]
    out = be.forward(0, q.bfloat16(), *pool.layer(0))
    assert out.dtype == torch.bfloat16
    ref = be.forward(0, q, *pool.layer(0))
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(ValueError, match="fmt must be a KVQuantFormat of head_dim 32"):
        QuantKVBackend(HQ, HKV, 32, fmt, pool.rotation)
    with pytest.raises(ValueError, match=r"rotation must be \[64, 64\]"):
        QuantKVBackend(HQ, HKV, D, fmt, torch.eye(32))
    with pytest.raises(RuntimeError, match="before plan"):
        QuantKVBackend(HQ, HKV, D, fmt, pool.rotation).forward(0, q, *pool.layer(0))

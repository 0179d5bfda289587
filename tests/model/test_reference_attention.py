"""Reference paged attention vs dense attention; metadata building; KV copy-on-write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.attention.base import AttentionBackend, build_attention_metadata
from dendrite.attention.reference import ReferenceBackend
from dendrite.model.kv_cache import KVCache

HQ, HKV, D, PAGE = 8, 2, 16, 4


def dense_attention(q, k, v, q_pos, window=None):
    """q [q, Hq, D] at positions q_pos over contiguous k/v [n, Hkv, D]."""
    g = HQ // HKV
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kpos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def make_batch(kv_lens, q_lens, seed=0, num_pages=64):
    """Random K/V for sequences on shuffled pages; the last q_lens[b] tokens are new."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(num_pages))
    cache = KVCache(1, num_pages, PAGE, HKV, D, torch.float32, "cpu")
    seqs, pos, slots, qo, kvp, kvi, last = [], [], [], [0], [0], [], []
    for n, ql in zip(kv_lens, q_lens):
        pages = [int(free.pop()) for _ in range((n + PAGE - 1) // PAGE)]
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        s = np.array([pages[i // PAGE] * PAGE + i % PAGE for i in range(n)])
        cache.write(0, torch.from_numpy(s), k, v)
        seqs.append((k, v, torch.randn(ql, HQ, D, generator=g), torch.arange(n - ql, n)))
        pos += list(range(n - ql, n))
        slots += list(s[n - ql :])
        qo.append(qo[-1] + ql)
        kvi += pages
        kvp.append(len(kvi))
        last.append(n - (len(pages) - 1) * PAGE)
    meta = build_attention_metadata(pos, slots, qo, kvp, kvi, last, page_size=PAGE)
    return cache, seqs, meta


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_dense(window):
    # decodes, a first prefill chunk, a later chunk, a one-token prompt, an idle sequence
    kv_lens, q_lens = [9, 1, 13, 20, 7, 4, 6], [1, 1, 13, 6, 1, 4, 0]
    cache, seqs, meta = make_batch(kv_lens, q_lens)
    assert not meta.is_decode
    backend = ReferenceBackend(HQ, HKV, D, PAGE, sliding_windows=[window])
    assert isinstance(backend, AttentionBackend)
    backend.plan(meta)
    q = torch.cat([s[2] for s in seqs])
    out = backend.forward(0, q, *cache.layer(0))
    ref = torch.cat([dense_attention(qq, k, v, p, window) for k, v, qq, p in seqs])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pure_decode_batch_and_dtype():
    cache, seqs, meta = make_batch([5, 17, 1, 8], [1, 1, 1, 1], seed=1)
    assert meta.is_decode
    backend = ReferenceBackend(HQ, HKV, D, PAGE)
    backend.plan(meta)
    q = torch.cat([s[2] for s in seqs])
    ref = torch.cat([dense_attention(qq, k, v, p) for k, v, qq, p in seqs])
    torch.testing.assert_close(backend.forward(0, q, *cache.layer(0)), ref, rtol=1e-5, atol=1e-5)
    k16, v16 = (t.to(torch.bfloat16) for t in cache.layer(0))
    out16 = backend.forward(0, q.to(torch.bfloat16), k16, v16)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, rtol=0.05, atol=0.05)


def test_forward_before_plan_raises():
    with pytest.raises(RuntimeError, match="plan"):
        ReferenceBackend(HQ, HKV, D).forward(
            0, torch.zeros(1, HQ, D), torch.zeros(1, PAGE, HKV, D), torch.zeros(1, PAGE, HKV, D)
        )


def test_metadata_fields_and_host_mirrors():
    meta = build_attention_metadata(
        np.array([3, 4, 0]),
        np.array([7, 8, 20]),
        np.array([0, 2, 3]),
        np.array([0, 2, 3]),
        np.array([1, 2, 5]),
        np.array([1, 1]),
        page_size=4,
    )
    assert meta.positions.dtype == torch.int64 and meta.slot_mapping.dtype == torch.int64
    for f in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len", "kv_lens"):
        assert getattr(meta, f).dtype == torch.int32
    assert meta.kv_lens.tolist() == [5, 1] and meta.host.kv_lens.tolist() == [5, 1]
    assert meta.num_tokens == 3 and meta.num_seqs == 2 and not meta.is_decode
    assert meta.last_token_indices().tolist() == [1, 2]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"slot_mapping": [1]}, "slots"),
        ({"qo_indptr": [0, 1, 2]}, "qo_indptr"),
        ({"kv_last_page_len": [5]}, "kv_last_page_len"),
        ({"kv_indices": [1, 2]}, "kv_indices"),
        ({"kv_lens": [3]}, "kv_lens"),
        ({"positions": [[0, 1]]}, "1-D"),
    ],
)
def test_metadata_validation_names_the_problem(bad, match):
    args = {
        "positions": [0, 1],
        "slot_mapping": [4, 5],
        "qo_indptr": [0, 2],
        "kv_indptr": [0, 1],
        "kv_indices": [1],
        "kv_last_page_len": [2],
    }
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        build_attention_metadata(page_size=4, **args)


def test_copy_pages_copies_exactly_n_tokens_in_all_layers():
    cache = KVCache(3, 8, PAGE, HKV, D, torch.float32, "cpu")
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    before = cache.kv.clone()
    # Chained rows: page 1 is both a destination and (for the next row) a source;
    # every source is read before any destination is written.
    cache.copy_pages(np.array([[0, 1, 3], [1, 2, 4], [5, 6, 0]], dtype=np.int32))
    kv = cache.kv
    assert torch.equal(kv[:, :, 1, :3], before[:, :, 0, :3])
    assert torch.equal(kv[:, :, 1, 3:], before[:, :, 1, 3:])  # past n: untouched
    assert torch.equal(kv[:, :, 2], before[:, :, 1])
    untouched = [0, 3, 4, 5, 6, 7]
    assert torch.equal(kv[:, :, untouched], before[:, :, untouched])
    cache.copy_pages(torch.tensor([[3, 4, 2]], dtype=torch.int32))
    assert torch.equal(cache.kv[:, :, 4, :2], before[:, :, 3, :2])
    cache.copy_pages(np.zeros((0, 3), dtype=np.int32))  # no-op
    with pytest.raises(ValueError):
        cache.copy_pages(np.array([[0, 8, 1]]))
    with pytest.raises(ValueError):
        cache.copy_pages(np.array([[0, 1, PAGE + 1]]))

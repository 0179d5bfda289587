"""The eager cascade backend of benchmarks/eager_cascade.py (measured by
bench_tree_gpu.py; not the engine's path): its rule, its flat fallbacks and
host page lists (CPU), FlashInfer's levels in torch (CPU), and the real
FlashInfer cascade against flat decode (CUDA only)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from eager_cascade import (  # noqa: E402
    CascadeBackend,
    disable_cascade,
    enable_cascade,
    use_cascade,
)


def csr(rows):
    indptr = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else \
        np.zeros(0, np.int32)
    return indptr, indices


def test_eager_rule_shape():
    # Monotone: more leaves or a longer shared prefix never turns cascade off.
    for b in (1, 2, 4, 16, 64):
        for s in (0, 512, 1024, 4096, 16384):
            for u in (16, 256, 4096):
                if use_cascade(b, s, u):
                    assert use_cascade(b * 2, s, u)
                    assert use_cascade(b, s * 2, u)
    assert not use_cascade(1, 1 << 20, 16)  # one leaf: nothing to share
    assert not use_cascade(64, 0, 16)
    # Measured on the H100 (eager engine): flat wins over a 4K prefix at 4..64 leaves.
    for b in (4, 16, 64):
        assert not use_cascade(b, 4096, 256)
    assert use_cascade(64, 16384, 256)  # far past the measured points: cascade


class _RecordingFence:
    """Stands in for PlanFence (CUDA events) and records the wrappers it guards."""

    def __init__(self):
        self.calls = []

    def before(self, wrapper):
        self.calls.append(("before", id(wrapper)))

    def after(self, wrapper):
        self.calls.append(("after", id(wrapper)))


class _FakeFlat:
    """Just enough of FlashInferBackend for the CPU-side decisions."""

    def __init__(self):
        self.page_size = 4
        self.sliding_windows = None
        self.workspace = torch.zeros(1)
        self.fi = None
        self.planned = []
        self.fence = _RecordingFence()

    def plan(self, meta):
        self.planned.append(meta)

    def forward(self, layer, q, k, v):
        return q


def _meta(rows, last, decode=True):
    from dendrite.attention.base import build_attention_metadata

    indptr, indices = csr(rows)
    lens = (np.diff(indptr) - 1) * 4 + np.asarray(last)
    b = len(rows)
    slots = [rows[i][-1] * 4 + last[i] - 1 for i in range(b)]
    return build_attention_metadata(lens - 1, slots, np.arange(b + 1), indptr, indices, last,
                                    page_size=4), indptr, indices


def test_backend_falls_back_to_flat_without_a_shared_prefix():
    flat = _FakeFlat()
    cb = CascadeBackend(flat, mode="always")
    meta, _, _ = _meta([[0, 1], [2, 3]], [1, 2])
    cb.plan(meta)
    assert not cb.last_step_was_cascade and flat.planned == [meta]
    assert cb.stats["flat_steps"] == 1 and cb.stats["host_reads"] == 1
    meta1, _, _ = _meta([[0, 1, 2]], [1])  # one row
    cb.plan(meta1)
    assert not cb.last_step_was_cascade
    never = CascadeBackend(flat, mode="never")
    meta2, _, _ = _meta([[0, 1, 2], [0, 1, 3]], [1, 1])
    never.plan(meta2)
    assert not never.last_step_was_cascade and never.stats["flat_steps"] == 1
    with pytest.raises(ValueError):
        CascadeBackend(flat, mode="sometimes")


def test_backend_uses_the_host_hint():
    flat = _FakeFlat()
    cb = CascadeBackend(flat, mode="auto", rule=lambda b, s, u: False)
    meta, indptr, indices = _meta([[0, 1, 2], [0, 1, 3]], [1, 1])
    cb.hint_host_indices(indptr, indices)
    cb.plan(meta)
    assert cb.stats["host_reads"] == 0 and cb.stats["last_shared_pages"] == 2
    assert not cb.last_step_was_cascade  # the rule said no


def test_enable_cascade_needs_flashinfer(make_engine):
    engine = make_engine()  # CPU: reference backend
    with pytest.raises(ValueError, match="FlashInfer"):
        enable_cascade(engine)
    disable_cascade(engine)  # no-op


class _FakeFlashInfer:
    """FlashInfer's cascade API in torch (CPU): a paged attention with LSE per
    level, merged as `MultiLevelCascadeAttentionWrapper.run` merges them. Checks
    the level page tables CascadeBackend builds, without a GPU."""

    class BatchPrefillWithPagedKVCacheWrapper:
        def __init__(self, workspace, layout, backend="auto"):
            self.backend = backend

        def plan(self, qo_indptr, kv_indptr, kv_indices, last, hq, hkv, d, ps, causal=False,
                 sm_scale=None, q_data_type=None, kv_data_type=None):
            self.qo, self.kvp = qo_indptr.tolist(), kv_indptr.tolist()
            self.idx, self.last = kv_indices.cpu().tolist(), last.tolist()
            self.ps, self.scale, self.group, self.causal = ps, sm_scale, hq // hkv, causal

        def run(self, q, kv, return_lse=False):
            k_cache, v_cache = kv
            out = torch.zeros_like(q, dtype=torch.float32)
            lse = torch.full(q.shape[:2], float("-inf"))
            for i in range(len(self.qo) - 1):
                pages = self.idx[self.kvp[i]:self.kvp[i + 1]]
                n = (len(pages) - 1) * self.ps + self.last[i]
                k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n].float()
                v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n].float()
                k = k.repeat_interleave(self.group, dim=1)
                v = v.repeat_interleave(self.group, dim=1)
                qi = q[self.qo[i]:self.qo[i + 1]].float()
                sc = torch.einsum("thd,nhd->htn", qi, k) * self.scale
                assert not self.causal
                lse[self.qo[i]:self.qo[i + 1]] = torch.logsumexp(sc, -1).T
                out[self.qo[i]:self.qo[i + 1]] = torch.einsum("htn,nhd->thd", sc.softmax(-1), v)
            return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    class MultiLevelCascadeAttentionWrapper:
        def __init__(self, levels, workspace, layout):
            self._batch_prefill_wrappers = [
                _FakeFlashInfer.BatchPrefillWithPagedKVCacheWrapper(workspace, layout)
                for _ in range(levels)]

        def plan(self, qo, kvp, idx, last, hq, hkv, d, ps, causal=False, **kw):
            for w, *lv in zip(self._batch_prefill_wrappers, qo, kvp, idx, last):
                w.plan(*lv, hq, hkv, d, ps, causal=causal, **kw)

        def run(self, q, kv):
            out, lse = self._batch_prefill_wrappers[-1].run(q, kv, return_lse=True)
            for w in self._batch_prefill_wrappers[:-1]:
                o2, l2 = w.run(q, kv, return_lse=True)
                m = torch.maximum(lse, l2)
                w1, w2 = (lse - m).exp()[..., None], (l2 - m).exp()[..., None]
                out = (out * w1 + o2 * w2) / (w1 + w2)
                lse = m + (w1 + w2).squeeze(-1).log()
            return out


@pytest.mark.parametrize("backend", ["fa2", "auto"])
def test_cascade_levels_match_reference_attention_cpu(backend):
    from dendrite.attention.reference import ReferenceBackend

    torch.manual_seed(0)
    hq, hkv, d, ps, b = 4, 2, 8, 4, 5
    shared, own = 6, 3
    num_pages = shared + b * own + 2
    k = torch.randn(num_pages, ps, hkv, d)
    v = torch.randn_like(k)
    rows = [list(range(shared)) + [shared + i * own + j for j in range(own - (i % 2))]
            for i in range(b)]  # uneven own lengths
    last = [1, 4, 2, 3, 4]
    indptr, indices = csr(rows)
    lens = (np.diff(indptr) - 1) * ps + np.asarray(last)
    slots = [rows[i][-1] * ps + last[i] - 1 for i in range(b)]
    from dendrite.attention.base import build_attention_metadata

    meta = build_attention_metadata(lens - 1, slots, np.arange(b + 1), indptr, indices, last,
                                    page_size=ps)
    q = torch.randn(b, hq, d)
    ref_backend = ReferenceBackend(hq, hkv, d, ps)
    ref_backend.plan(meta)
    ref = ref_backend.forward(0, q, k, v)

    flat = _FakeFlat()
    flat.page_size, flat.fi = ps, _FakeFlashInfer
    flat.num_heads, flat.num_kv_heads, flat.head_dim = hq, hkv, d
    flat.sm_scale, flat.dtype, flat.device = d ** -0.5, torch.float32, torch.device("cpu")
    cb = CascadeBackend(flat, mode="always", prefill_backend=backend)
    cb.hint_host_indices(indptr, indices)
    cb.plan(meta)
    assert cb.last_step_was_cascade and cb.stats["last_shared_pages"] == shared
    assert cb.stats["host_reads"] == 0 and flat.planned == []
    # The cascade wrapper's plan is fenced like the flat ones (pinned schedule buffer).
    assert flat.fence.calls == [("before", id(cb._wrapper)), ("after", id(cb._wrapper))]
    levels = cb._wrapper._batch_prefill_wrappers
    assert levels[0].qo == [0, b] and levels[0].kvp == [0, shared] and levels[0].last == [ps]
    assert levels[1].kvp == (indptr - shared * np.arange(b + 1)).tolist()
    torch.testing.assert_close(cb.forward(0, q, k, v), ref, atol=1e-5, rtol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + FlashInfer")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch,shared_pages,unique_pages", [(4, 8, 3), (16, 64, 5)])
def test_cascade_matches_flat_decode(batch, shared_pages, unique_pages):
    pytest.importorskip("flashinfer")
    from dendrite.attention.base import build_attention_metadata
    from dendrite.attention.flashinfer_backend import FlashInferBackend

    torch.manual_seed(0)
    hq, hkv, d, ps = 32, 8, 64, 16
    flat = FlashInferBackend(hq, hkv, d, page_size=ps, dtype=torch.bfloat16, device="cuda")
    num_pages = shared_pages + batch * unique_pages + 1
    k = torch.randn(num_pages, ps, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = [list(range(shared_pages)) +
            list(range(shared_pages + i * unique_pages, shared_pages + (i + 1) * unique_pages))
            for i in range(batch)]
    last = np.random.default_rng(0).integers(1, ps + 1, size=batch)
    indptr, indices = csr(rows)
    lens = (np.diff(indptr) - 1) * ps + last
    slots = [rows[i][-1] * ps + last[i] - 1 for i in range(batch)]
    meta = build_attention_metadata(lens - 1, slots, np.arange(batch + 1), indptr, indices,
                                    last, page_size=ps, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    flat.plan(meta)
    ref = flat.forward(0, q, k, v)
    cb = CascadeBackend(flat, mode="always")
    cb.plan(meta)
    assert cb.last_step_was_cascade and cb.stats["last_shared_pages"] == shared_pages
    out = cb.forward(0, q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

"""FlashInfer backend vs the torch reference backend on random paged KV (GPU).

Kernel-level checks, independent of any model: random queries and caches,
pages scattered over the pool, batches that mix fresh prefills, extends onto
existing KV and single-token decode rows; then pure decode batches; then the
CUDA-graph decode wrapper captured once and replayed over new page tables.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from dendrite.attention.base import build_attention_metadata  # noqa: E402
from dendrite.attention.reference import ReferenceBackend  # noqa: E402

from gpu_helpers import report  # noqa: E402

HQ, HKV, D, PS = 8, 2, 64, 16
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def fi_backend_cls():
    pytest.importorskip("flashinfer")
    from dendrite.attention.flashinfer_backend import FlashInferBackend
    return FlashInferBackend


def make_case(q_lens, kv_lens, seed, num_pages=None):
    """Random q, K/V pool and metadata; the step's tokens are the last q_len of each seq."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rng = np.random.default_rng(seed)
    need = sum(math.ceil(n / PS) for n in kv_lens)
    num_pages = num_pages or need + 5
    perm = rng.permutation(num_pages)
    pos, slots, qo, kvp, kvi, last = [], [], [0], [0], [], []
    nxt = 0
    for q_len, kv_len in zip(q_lens, kv_lens):
        pages = perm[nxt:nxt + math.ceil(kv_len / PS)].tolist()
        nxt += len(pages)
        for p in range(kv_len - q_len, kv_len):
            pos.append(p)
            slots.append(pages[p // PS] * PS + p % PS)
        qo.append(len(pos))
        kvi += pages
        kvp.append(len(kvi))
        last.append(kv_len - (len(pages) - 1) * PS)
    meta = build_attention_metadata(pos, slots, qo, kvp, kvi, last, page_size=PS, device="cuda")
    kv = torch.randn(2, num_pages, PS, HKV, D, generator=g).to("cuda", DTYPE)
    q = torch.randn(len(pos), HQ, D, generator=g).to("cuda", DTYPE)
    return q, kv, meta


def compare(fi_backend_cls, q, kv, meta, name, sliding_windows=None):
    fi = fi_backend_cls(HQ, HKV, D, PS, dtype=DTYPE, device="cuda",
                        sliding_windows=sliding_windows)
    ref = ReferenceBackend(HQ, HKV, D, PS, sliding_windows=sliding_windows)
    fi.plan(meta)
    ref.plan(meta)
    out = fi.forward(0, q, kv[0], kv[1])
    exp = ref.forward(0, q, kv[0], kv[1])
    assert out.shape == q.shape and out.dtype == DTYPE
    assert torch.isfinite(out).all()
    rel = ((out.float() - exp.float()).norm() / exp.float().norm()).item()
    worst = (out.float() - exp.float()).abs().max().item()
    report(name, rel_err=rel, max_abs_err=worst, tokens=q.shape[0])
    assert rel < 1e-2, f"{name}: relative error {rel:.2e}"
    return fi


def test_prefill_mixed_batch(fi_backend_cls):
    # fresh prompt, extend onto cached KV, decode rows, page-aligned and not
    q_lens = [7, 33, 1, 16, 100, 1, 5]
    kv_lens = [7, 50, 40, 16, 300, 1, 129]
    q, kv, meta = make_case(q_lens, kv_lens, seed=0)
    assert not meta.is_decode
    compare(fi_backend_cls, q, kv, meta, "fi_vs_ref_prefill_mixed")


def test_decode_batch(fi_backend_cls):
    rng = np.random.default_rng(1)
    kv_lens = rng.integers(1, 700, size=13).tolist() + [16, 17, 1]
    q, kv, meta = make_case([1] * len(kv_lens), kv_lens, seed=1)
    assert meta.is_decode
    compare(fi_backend_cls, q, kv, meta, "fi_vs_ref_decode")


def test_decode_long_single(fi_backend_cls):
    # one long sequence: FlashInfer splits the KV across blocks and merges
    q, kv, meta = make_case([1], [4000], seed=2)
    compare(fi_backend_cls, q, kv, meta, "fi_vs_ref_decode_long")


@pytest.mark.slow  # builds the sliding-window kernel variants (minutes of JIT)
def test_sliding_window(fi_backend_cls):
    q, kv, meta = make_case([1, 9, 1], [40, 30, 5], seed=3)
    compare(fi_backend_cls, q, kv, meta, "fi_vs_ref_prefill_window", sliding_windows=[8])
    q, kv, meta = make_case([1, 1, 1], [40, 30, 5], seed=4)
    compare(fi_backend_cls, q, kv, meta, "fi_vs_ref_decode_window", sliding_windows=[8])


def test_graph_decode_wrapper_replays_new_tables(fi_backend_cls):
    """Capture one decode attention call; replays over other page tables are exact."""
    from dendrite.attention.flashinfer_backend import GraphDecodeWrapper

    bs, num_pages = 4, 200
    fi = fi_backend_cls(HQ, HKV, D, PS, dtype=DTYPE, device="cuda")
    gw = GraphDecodeWrapper(fi, bs, max_pages=num_pages)
    q_static = torch.zeros(bs, HQ, D, dtype=DTYPE, device="cuda")
    kv = torch.randn(2, num_pages, PS, HKV, D, device="cuda").to(DTYPE)

    def tables(kv_lens, seed):
        _, _, meta = make_case([1] * bs, kv_lens, seed=seed, num_pages=num_pages)
        return meta

    meta0 = tables([5, 17, 64, 1], 10)
    gw.plan(meta0.host.kv_indptr, meta0.kv_indices, meta0.host.kv_last_page_len)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gw.run(q_static, kv[0], kv[1])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = gw.run(q_static, kv[0], kv[1])

    for i, kv_lens in enumerate([[5, 17, 64, 1], [300, 2, 33, 150], [1, 1, 1, 1000]]):
        meta = tables(kv_lens, 20 + i)
        q = torch.randn(bs, HQ, D, device="cuda").to(DTYPE)
        q_static.copy_(q)
        gw.plan(meta.host.kv_indptr, meta.kv_indices, meta.host.kv_last_page_len)
        graph.replay()
        eager = fi_backend_cls(HQ, HKV, D, PS, dtype=DTYPE, device="cuda")
        eager.plan(meta)
        exp = eager.forward(0, q, kv[0], kv[1])
        ref = ReferenceBackend(HQ, HKV, D, PS)
        ref.plan(meta)
        exp_ref = ref.forward(0, q, kv[0], kv[1])
        rel_ref = ((out_static.float() - exp_ref.float()).norm() / exp_ref.float().norm()).item()
        rel_eager = ((out_static.float() - exp.float()).norm() / exp.float().norm()).item()
        report("graph_wrapper_replay", case=i, rel_vs_eager=rel_eager, rel_vs_ref=rel_ref)
        assert rel_ref < 1e-2
        assert rel_eager < 1e-2

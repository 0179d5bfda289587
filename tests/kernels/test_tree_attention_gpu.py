"""The tree-attention kernels on CUDA (bf16), against the float64 reference,
and replayed from a CUDA graph after re-planning (fixed buffers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tree_attention_case import random_tree, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

pytest.importorskip("triton")

PAGE = 16


def make_cache(num_pages: int, hkv: int, d: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv = torch.randn(2, num_pages, PAGE, hkv, d, generator=g, device="cuda",
                     dtype=torch.bfloat16)
    return kv[0], kv[1]


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (16, 8, 128), (28, 4, 128), (8, 8, 64)])
@pytest.mark.parametrize("leaves,bucket,shared,own", [
    (1, 1, 0, 260),     # one long sequence, flat split-KV
    (16, 16, 256, 3),   # the shape: 16 leaves over 4K shared tokens
    (6, 8, 40, 20),     # padding rows, own ranges longer than the shared one
    (37, 64, 17, 2),    # more leaves than one tile holds
])
def test_matches_reference(hq, hkv, d, leaves, bucket, shared, own):
    from dendrite.kernels.tree_attention import TreeAttention

    num_pages = shared + leaves * own + 2
    k, v = make_cache(num_pages, hkv, d, seed=leaves)
    rng = np.random.default_rng(leaves + shared)
    indptr, indices, last = random_tree(rng, num_pages, PAGE, leaves, shared, own)
    q = torch.randn(bucket, hq, d, device="cuda", dtype=torch.bfloat16)
    ta = TreeAttention(hq, hkv, d, PAGE, bucket, len(indices), "cuda")
    wp = ta.plan(indptr, torch.from_numpy(indices).cuda(), last, shared)
    out = ta.run(q, k, v)
    ref = reference(q[:leaves], k, v, indptr, indices, last)
    err = (out[:leaves].double().cpu() - ref).abs().max().item()
    assert err < 1.5e-2, err
    assert (out[leaves:] == 0).all()
    assert wp.splits[:leaves].min() >= (2 if shared else 1)


def test_graph_replay_follows_new_plans():
    """Captured once, replayed under plans of other shapes (shared length,
    leaves, own lengths): the kernels read only the fixed buffers."""
    from dendrite.kernels.tree_attention import TreeAttention

    hq, hkv, d, bucket = 32, 8, 64, 16
    num_pages = 1200
    k, v = make_cache(num_pages, hkv, d, seed=7)
    q = torch.randn(bucket, hq, d, device="cuda", dtype=torch.bfloat16)
    ta = TreeAttention(hq, hkv, d, PAGE, bucket, 16384, "cuda")
    rng = np.random.default_rng(3)
    first = random_tree(rng, num_pages, PAGE, 4, 2, 2)
    ta.plan(first[0], torch.from_numpy(first[1]).cuda(), first[2], 2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ta.run(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.run(q, k, v)
    for leaves, shared, own in ((4, 2, 2), (16, 256, 4), (9, 0, 40), (16, 700, 1)):
        indptr, indices, last = random_tree(rng, num_pages, PAGE, leaves, shared, own)
        ta.plan(indptr, torch.from_numpy(indices).cuda(), last, shared)
        graph.replay()
        ref = reference(q[:leaves], k, v, indptr, indices, last)
        err = (out[:leaves].double().cpu() - ref).abs().max().item()
        assert err < 1.5e-2, (leaves, shared, own, err)
        assert (out[leaves:] == 0).all()

"""The engine on N-bit KV pages (`Engine(kv_dtype="int4")`, "int3") on the tiny model:
it generates, forks in O(1) (copy-on-write copies carry the rows' scales, so a
branch draws what an unforked run draws), reuses the prefix cache, leaks no
page (the fixture checks), and refuses what cannot read the pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.kv import check_invariants
from dendrite.model.kv_quant import kv_quant_format
from dendrite.model.kv_quant_cache import QuantKVCache
from dendrite.sampling import SamplingParams

PROMPT = "the quick brown fox jumps over the lazy dog and then it runs away"


@pytest.mark.parametrize("kv_dtype", ["int4", "int3"])
def test_generates_on_packed_pages(make_engine, kv_dtype):
    e = make_engine(kv_dtype=kv_dtype)
    pool = e.runner.kv_cache
    assert isinstance(pool, QuantKVCache) and pool.kv.dtype == torch.uint8
    fmt = kv_quant_format(kv_dtype, e.runner.config.head_dim)
    cfg = e.runner.config
    stats = e.memory_stats()
    assert stats["kv_dtype"] == kv_dtype
    assert stats["kv_bytes_per_token"] == fmt.bytes_per_token(cfg.num_layers, cfg.num_kv_heads)
    assert e.runner.kv_bytes_per_token == stats["kv_bytes_per_token"]
    r = e.generate(e.new_sequence(PROMPT),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert len(r.token_ids) == 24 and np.isfinite(r.logprobs).all()
    assert pool.kv.any()  # the pages were written in the packed format


def test_int4_logits_near_full_precision(tiny_model_dir):
    """The same prompt's next-token distribution with int4 pages stays near the
    float32 pool's (the tiny model's K/V are random-like: a loose bound)."""
    from dendrite.model.runner import ModelRunner

    probs = []
    for kv in ("auto", "int4"):
        r = ModelRunner(tiny_model_dir, "cpu", num_pages=16, kv_dtype=kv)
        ids = r.tokenizer.encode(PROMPT)
        t = len(ids)
        meta = r.build_metadata(list(range(t)), list(range(t)), [0, t], [0, (t + 15) // 16],
                                list(range((t + 15) // 16)), [t - ((t + 15) // 16 - 1) * 16])
        probs.append(r.run(ids, meta, logits_indices=list(range(t))).softmax(-1))
    tv = 0.5 * (probs[0] - probs[1]).abs().sum(-1)  # total variation per position
    assert tv.max() < 0.1 and tv.mean() > 0  # close, and not the same pool by mistake


def test_fork_is_o1_and_branches_equal_unforked(make_engine):
    e = make_engine(kv_dtype="int4", num_pages=128)
    params = SamplingParams(temperature=1.1, seed=5, max_tokens=20, ignore_eos=True)
    ref = e.generate(e.new_sequence(PROMPT), params)[0]
    root = e.new_sequence(PROMPT)
    e.flush([root])
    used = e.pool.used
    kids = root.fork(4)
    assert e.pool.used == used  # fork moved and allocated nothing
    out = e.generate(kids, params)
    for r in out:
        assert r.token_ids == ref.token_ids
        assert np.allclose(r.logprobs, ref.logprobs, atol=1e-5)
    check_invariants(e.pool, [e.tree], [e.cache])


def test_copy_on_write_carries_codes_and_scales(make_engine):
    e = make_engine(kv_dtype="int4")
    root = e.new_sequence(PROMPT)
    e.flush([root])
    n, ps = root.num_cached, e.page_size
    assert n % ps, "the prompt must end inside a page for a copy to happen"
    parent_last = int(e.tree.pages(root.node)[-1])
    kv = e.runner.kv_cache.kv
    kids = root.fork(2)
    e.generate(kids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    filled = n % ps
    for kid in kids:
        last = int(e.tree.pages(kid.node)[(n - 1) // ps])
        assert last != parent_last  # the child wrote into a private copy
        # the copied rows are the parent's bytes: codes and fp16 scales/mins, every layer
        assert torch.equal(kv[:, :, last, :filled], kv[:, :, parent_last, :filled])
    check_invariants(e.pool, [e.tree], [e.cache])


def test_prefix_cache_reuse(make_engine):
    e = make_engine(kv_dtype="int4")
    prompt = PROMPT * 3
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    s1 = e.new_sequence(prompt)
    r1 = e.generate(s1, params)[0]
    s1.release()
    s2 = e.new_sequence(prompt)
    assert e.stats["prefix_tokens_reused"] >= 16
    assert e.generate(s2, params)[0].token_ids == r1.token_ids
    check_invariants(e.pool, [e.tree], [e.cache])


def test_bad_kv_dtype_and_backend(tiny_model_dir):
    from dendrite.engine import Engine

    with pytest.raises(ValueError, match="kv_dtype must be one of auto, fp8_e4m3, int4, int3"):
        Engine(tiny_model_dir, device="cpu", num_pages=8, kv_dtype="int2")
    with pytest.raises(ValueError, match="FlashInfer cannot read N-bit pages"):
        Engine(tiny_model_dir, device="cpu", num_pages=8, kv_dtype="int4",
               attention="flashinfer")

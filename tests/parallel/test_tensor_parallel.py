"""TP=2 (two processes, gloo) gives what TP=1 gives on the tiny model: greedy and
seeded tokens identical, logprobs close (the all-reduce changes the float32
summation order only), through forks, a prefix-cache hit and lookahead."""

import numpy as np
import pytest
import torch
from tp_fixtures import one_torch_thread, tp_model_dir  # noqa: F401 (fixtures)

from dendrite.engine import Engine
from dendrite.model.loader import load
from dendrite.parallel import TensorParallelRunner, load_shard
from dendrite.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Question: Natalia sold clips", "SELECT * FROM branches"]


@pytest.fixture(scope="module")
def one(tp_model_dir):
    e = Engine(tp_model_dir, device="cpu", num_pages=256)
    yield e
    e.close()


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "lookahead"])
def two(tp_model_dir, request):
    e = Engine(tp_model_dir, device="cpu", num_pages=256, tensor_parallel=2,
               lookahead=request.param)
    yield e
    e.close()


def _gen(engine, prompts, params):
    seqs = [engine.new_sequence(p) for p in prompts]
    out = engine.generate(seqs, params)
    for s in seqs:
        s.release()
    return out


def _same(a, b):
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=0, atol=1e-4)


def test_runner_is_sharded(two):
    assert isinstance(two.runner, TensorParallelRunner)
    assert two.runner.tensor_parallel == 2
    cfg = two.runner.config
    assert (cfg.num_heads, cfg.num_kv_heads) == (2, 1)  # of 4 and 2
    assert two.runner.kv_cache.num_kv_heads == 1


def test_shard_holds_its_slice(tp_model_dir):
    full = load(tp_model_dir).model.model.layers[1]
    for rank in range(2):
        shard = load_shard(tp_model_dir, rank, 2).model.model.layers[1]
        d = 16
        q_full = full.self_attn.qkv_proj.weight[:4 * d]
        v_full = full.self_attn.qkv_proj.weight[6 * d:]
        q, _, v = shard.self_attn.qkv_proj.weight.split([2 * d, d, d])
        torch.testing.assert_close(q, q_full[rank * 2 * d:(rank + 1) * 2 * d], rtol=0, atol=0)
        torch.testing.assert_close(v, v_full[rank * d:(rank + 1) * d], rtol=0, atol=0)
        torch.testing.assert_close(shard.self_attn.o_proj.weight,
                                   full.self_attn.o_proj.weight[:, rank * 2 * d:(rank + 1) * 2 * d],
                                   rtol=0, atol=0)
        inter = full.mlp.down_proj.weight.shape[1] // 2
        torch.testing.assert_close(shard.mlp.down_proj.weight,
                                   full.mlp.down_proj.weight[:, rank * inter:(rank + 1) * inter],
                                   rtol=0, atol=0)
        bias = shard.self_attn.o_proj.bias
        assert bool((bias == full.self_attn.o_proj.bias).all()) if rank == 0 \
            else bool((bias == 0).all())


def test_greedy_tokens_equal(one, two):
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    a, b = _gen(one, PROMPTS, p), _gen(two, PROMPTS, p)
    _same(a, b)
    # the lookahead engine sent steps whose token ids were still device tensors
    assert (two.stats["lookahead_steps"] > 0) == two.lookahead
    for x, y in zip(a, b):  # top alternatives agree too
        assert [[t for t, _ in row] for row in x.top_logprobs] == \
            [[t for t, _ in row] for row in y.top_logprobs]


def test_seeded_sampling_equal(one, two):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=24, ignore_eos=True)
    _same(_gen(one, PROMPTS, p), _gen(two, PROMPTS, p))


def test_forks_and_prefix_cache_hit(one, two):
    """Forked branches (copy-on-write of a shared partial page) and a prompt
    served from the prefix cache decode the same tokens on both."""
    prompt = "A tree of thought explores many continuations of one context; each"
    results = []
    for e in (one, two):
        root = e.new_sequence(prompt)
        e.generate([root], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        kids = root.fork(4)
        out = [e.generate([k], SamplingParams(temperature=0.8, seed=i, max_tokens=12,
                                              ignore_eos=True))[0]
               for i, k in enumerate(kids[:2])]
        out += e.generate(kids[2:], SamplingParams(temperature=0.8, seed=9, max_tokens=12,
                                                   ignore_eos=True))
        for k in kids:
            k.release()
        root.release()
        reused = e.stats["prefix_tokens_reused"]
        again = _gen(e, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert e.stats["prefix_tokens_reused"] > reused  # served from the radix cache
        results.append(out + again)
    _same(*results)

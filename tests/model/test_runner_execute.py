"""`ModelRunner.execute(StepPlan)`: the engine's one call per step. On the CPU it
runs eagerly; the logits of the sampling rows equal the model's on the same
history, copy-on-write runs before the step writes, and the runner's
arguments (kernel config, graphs, cascade) are checked before it loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.kernels.config import KernelConfig
from dendrite.kv import BlockPool, KVTree
from dendrite.model.runner import ModelRunner, StepPlan
from dendrite.tiny_model import build_tiny_model

PAGE = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=8)


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, num_pages=64, page_size=PAGE, attention="reference")


def _plan(tree, nodes, toks, sample_rows) -> StepPlan:
    counts = np.asarray([len(t) for t in toks], dtype=np.int32)
    starts = np.asarray([tree.num_tokens(n) for n in nodes], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in toks])
    app = tree.append_batch(np.asarray(nodes, np.int64), counts, flat)
    indptr, indices, last = tree.export_csr(np.asarray(nodes, np.int64))
    qo = np.zeros(len(nodes) + 1, dtype=np.int32)
    np.cumsum(counts, out=qo[1:])
    pos = np.repeat(starts - qo[:-1], counts) + np.arange(len(flat))
    return StepPlan(flat, pos, app.slot_mapping, qo, indptr, indices, last, app.copies,
                    np.asarray(sample_rows, dtype=np.int64))


def _full_logits(runner, ids: list[int]) -> torch.Tensor:
    """Every position's logits of one fresh sequence (pages 40.. of the pool)."""
    t = len(ids)
    n = -(-t // PAGE)
    pages = np.arange(40, 40 + n)
    meta = runner.build_metadata(np.arange(t), pages[np.arange(t) // PAGE] * PAGE
                                 + np.arange(t) % PAGE, [0, t], [0, n], pages,
                                 [t - (n - 1) * PAGE])
    return runner.run(ids, meta, logits_indices=np.arange(t))


def test_execute_returns_the_sampling_rows_of_forked_branches(runner):
    assert runner.graphs is None and runner.allocatable_pages == runner.num_pages
    tree = KVTree(BlockPool(40, PAGE))  # pages 40.. stay free for the references
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, runner.vocab_size, 10).tolist()
    root = tree.new_sequence()
    first = runner.execute(_plan(tree, [root], [prompt], [0]))
    assert first.shape == (1, runner.vocab_size) and first.dtype == torch.float32
    kids = [int(k) for k in tree.fork(root, 3)]  # the partial last page is copied on write
    own = [rng.integers(0, runner.vocab_size, n).tolist() for n in (1, 3, 2)]
    plan = _plan(tree, kids, own, [0, 2])  # the middle branch does not sample
    assert len(plan.copies) == 3 and plan.num_rows == 3 and plan.num_tokens == 6
    got = runner.execute(plan)
    assert got.shape == (2, runner.vocab_size)
    for row, b in enumerate([0, 2]):
        want = _full_logits(runner, prompt + own[b])[-1]
        torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[0], _full_logits(runner, prompt)[-1], atol=1e-4,
                               rtol=1e-4)
    # A decode step of every branch: one row each, all sampling.
    nxt = [[int(t)] for t in rng.integers(0, runner.vocab_size, 3)]
    got = runner.execute(_plan(tree, kids, nxt, [0, 1, 2]))
    for b in range(3):
        want = _full_logits(runner, prompt + own[b] + nxt[b])[-1]
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


def test_runner_kernel_config_defaults_from_the_environment(model_dir, monkeypatch):
    monkeypatch.setenv("DENDRITE_FUSED_SAMPLING", "0")
    r = ModelRunner(model_dir, num_pages=8, page_size=PAGE, attention="reference")
    assert r.kernels == KernelConfig(fused_sampling=False)
    mine = KernelConfig(gemv=False)
    r = ModelRunner(model_dir, num_pages=8, page_size=PAGE, attention="reference", kernels=mine)
    assert r.kernels is mine
    # cuda_graphs on the CPU: nothing to capture, every page is the allocator's.
    r = ModelRunner(r.loaded, num_pages=8, page_size=PAGE, attention="reference",
                    cuda_graphs=True)
    assert r.graphs is None and r.allocatable_pages == 8
    assert r.kv_bytes_per_page * 8 == r.kv_cache.nbytes


@pytest.mark.parametrize("kw, exc, needle", [
    ({"kernels": {"gemv": False}}, TypeError, "kernels must be a KernelConfig"),
    ({"cuda_graphs": "yes"}, TypeError, "cuda_graphs must be a bool"),
    ({"cascade": "sometimes"}, ValueError, "cascade must be 'auto', 'always' or 'never'"),
])
def test_bad_step_arguments_fail_before_loading(model_dir, kw, exc, needle):
    with pytest.raises(exc, match=needle):
        ModelRunner(model_dir, num_pages=8, **kw)


def test_bad_environment_fails_before_loading(model_dir, monkeypatch):
    monkeypatch.setenv("DENDRITE_SKINNY", "fast")
    with pytest.raises(ValueError, match="DENDRITE_SKINNY must be 0 or 1"):
        ModelRunner(model_dir)  # (a load would take the whole memory budget's KV pool)


def test_engine_hands_its_kernel_config_to_the_runner_and_sampler(model_dir):
    from dendrite.engine import Engine

    cfg = KernelConfig(fused_sampling=False, tree_attention=False)
    e = Engine(model_dir, device="cpu", num_pages=16, kernels=cfg)
    try:
        assert e.runner.kernels is cfg and e.sampler.kernels is cfg
        assert e.pool.free + e.pool.used == e.runner.allocatable_pages == 16
    finally:
        e.close()

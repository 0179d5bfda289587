"""The benchmark-only graph variants of benchmarks/graph_variants.py (GPU): the
graph that also takes greedy tokens and the torch.compile'd graph match eager
decode; their helper kernels match the torch ops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from dendrite.tiny_model import build_tiny_model  # noqa: E402

from gpu_helpers import Pager, rel_err, report  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

PAGE_SIZE, NUM_PAGES = 16, 160


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    pytest.importorskip("flashinfer")
    from dendrite.model.runner import ModelRunner

    d = build_tiny_model(tmp_path_factory.mktemp("m"), "qwen3", seed=21, hidden_size=256,
                         heads=4, kv_heads=2, head_dim=64, num_layers=3,
                         intermediate_size=512, dtype="bfloat16")
    return ModelRunner(d, device="cuda", dtype=torch.bfloat16, num_pages=NUM_PAGES,
                       page_size=PAGE_SIZE, attention="flashinfer")


def test_greedy_graph_tokens_are_the_argmax(runner):
    from graph_variants import GreedyGraphRunner, set_skip_redundant_plans

    graphs = GreedyGraphRunner(runner.model, runner.kv_cache, runner.backend,
                               max_batch_size=4, kernels=runner.kernels)
    graphs.capture()
    rng = np.random.default_rng(1)
    pager = Pager(NUM_PAGES, PAGE_SIZE, seed=2)
    sids = [pager.new() for _ in range(3)]
    ids, meta = pager.step([(s, rng.integers(0, runner.vocab_size, 9).tolist()) for s in sids],
                           "cuda")
    last = runner.run(ids, meta).argmax(-1)
    set_skip_redundant_plans(graphs, False)
    for _ in range(6):
        ids, meta = pager.step([(s, [int(t)]) for s, t in zip(sids, last.tolist())], "cuda")
        eager = runner.run(ids, meta)
        logits, tokens = graphs.run(ids, meta)
        assert torch.equal(tokens, logits.argmax(-1))
        assert float(rel_err(logits, eager).max()) < 2e-2
        last = tokens.clone()
    assert graphs.planner_calls >= 6  # re-planned every step


def test_compiled_graph_matches_eager(runner):
    """The torch.compile'd graph (fused elementwise ops, custom K/V-write and attention ops)."""
    from graph_variants import CompiledGraphRunner

    graphs = CompiledGraphRunner(runner.model, runner.kv_cache, runner.backend,
                                 max_batch_size=4, buckets=(4,), kernels=runner.kernels)
    graphs.capture()
    rng = np.random.default_rng(5)
    pager = Pager(NUM_PAGES, PAGE_SIZE, seed=7)
    sids = [pager.new() for _ in range(3)]  # 3 rows in the bucket of 4: one pad row
    prompts = [rng.integers(0, runner.vocab_size, size=n).tolist() for n in (5, 17, 30)]
    ids, meta = pager.step(list(zip(sids, prompts)), "cuda")
    last = runner.run(ids, meta).argmax(-1)
    errs, agree = [], []
    for _ in range(24):
        ids, meta = pager.step([(s, [int(t)]) for s, t in zip(sids, last.tolist())], "cuda")
        eager = runner.run(ids, meta)
        logits, tokens = graphs.run(ids, meta)
        errs.append(rel_err(logits, eager).max().item())
        agree.append((tokens == eager.argmax(-1)).float().mean().item())
        last = eager.argmax(-1)  # teacher-force the eager path's tokens
    report("compiled_cuda_graph_vs_eager", steps=len(errs), relerr_max=max(errs),
           relerr_mean=float(np.mean(errs)), top1_agreement=float(np.mean(agree)))
    # Fused kernels keep fp32 where eager rounds to bf16: bf16-sized differences only.
    assert max(errs) < 3e-2 and np.mean(errs) < 1.5e-2


def test_scatter_rows_matches_index_put():
    from graph_variants import greedy_tokens, scatter_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    dst = torch.randn(4096, 512, device="cuda", generator=g).to(torch.bfloat16)
    exp = dst.clone()
    rows = torch.randperm(4096, device="cuda", generator=g)[:37]
    src = torch.randn(37, 512, device="cuda", generator=g).to(torch.bfloat16)
    scatter_rows(dst, rows, src)
    exp[rows] = src
    assert torch.equal(dst, exp)
    logits = torch.randn(7, 128256, device="cuda", generator=g)
    logits[3] = 0.0  # all tied: the lowest index wins, as with argmax
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))

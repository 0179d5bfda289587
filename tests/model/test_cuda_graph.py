"""CUDA-graph decode replay == eager FlashInfer decode (GPU).

A tiny bf16 model is prefilled eagerly, then decoded step by step; every step
runs the eager path and the graph replay on the same inputs and history. The
active batch shrinks over time (8 -> 5 -> 2 -> 1) so replays switch buckets
and pad rows; pages nobody owns must stay untouched (pad rows write only the
reserved pad page). `ModelRunner.execute` replays the graphs exactly for the
steps they cover and runs the rest eagerly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from dendrite.tiny_model import build_tiny_model  # noqa: E402

from gpu_helpers import Pager, rel_err, report  # noqa: E402

PAGE_SIZE, NUM_PAGES = 16, 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("flashinfer")
    from dendrite.model.cuda_graph import CudaGraphDecodeRunner
    from dendrite.model.runner import ModelRunner

    d = build_tiny_model(tmp_path_factory.mktemp("m"), "qwen3", seed=21, hidden_size=256,
                         heads=4, kv_heads=2, head_dim=64, num_layers=3,
                         intermediate_size=512, dtype="bfloat16")
    runner = ModelRunner(d, device="cuda", dtype=torch.bfloat16, num_pages=NUM_PAGES,
                         page_size=PAGE_SIZE, attention="flashinfer")
    graphs = CudaGraphDecodeRunner(runner.model, runner.kv_cache, runner.backend,
                                   max_batch_size=8)
    graphs.capture()
    return runner, graphs


def test_buckets_captured(setup):
    _, graphs = setup
    assert graphs.captured_buckets == (1, 2, 4, 8)


def test_graph_replay_matches_eager(setup):
    runner, graphs = setup
    rng = np.random.default_rng(0)
    pager = Pager(NUM_PAGES, PAGE_SIZE, seed=1)
    n_seq, vocab = 8, runner.vocab_size
    sids = [pager.new() for _ in range(n_seq)]
    prompts = [rng.integers(0, vocab, size=int(n)).tolist() for n in rng.integers(1, 40, n_seq)]
    ids, meta = pager.step(list(zip(sids, prompts)), "cuda")
    last = runner.run(ids, meta).argmax(-1)
    active = list(range(n_seq))
    schedule = {12: 5, 24: 2, 36: 1}  # step -> active batch size from then on
    errs, agree, t_eager, t_graph = [], [], [], []
    for step in range(48):
        if step in schedule:
            keep = schedule[step]
            last = last[:keep]
            active = active[:keep]
        batch = [(sids[j], [int(t)]) for j, t in zip(active, last.tolist())]
        ids, meta = pager.step(batch, "cuda")
        assert meta.is_decode and graphs.can_run(meta)

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eager = runner.run(ids, meta)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        logits = graphs.run(ids, meta)
        tokens = logits.argmax(-1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_eager.append(t1 - t0)
        t_graph.append(t2 - t1)

        assert logits.shape == eager.shape
        errs.append(rel_err(logits, eager).max().item())
        agree.append((tokens == eager.argmax(-1)).float().mean().item())
        last = tokens.clone()

    # Pages never handed out (and not the pad page) were never written.
    used = {p for s in pager.seqs for p in s.pages} | {graphs.pad_page}
    untouched = [p for p in range(NUM_PAGES) if p not in used]
    kv = runner.kv_cache.kv
    assert untouched and kv[:, :, untouched].abs().max().item() == 0.0

    report("cuda_graph_vs_eager", steps=len(errs), relerr_max=max(errs),
           top1_agreement=float(np.mean(agree)), planner_calls=graphs.planner_calls,
           eager_ms=1e3 * float(np.median(t_eager)), graph_ms=1e3 * float(np.median(t_graph)))
    assert max(errs) < 2e-2
    assert np.mean(agree) >= 0.99
    # FlashInfer's planner ran only when some row's page count changed.
    assert graphs.planner_calls < len(errs)


@pytest.mark.parametrize("tree_attention", [False, True], ids=["flashinfer", "tree"])
def test_cascade_graph_matches_flat_and_eager(tmp_path, tree_attention):
    """Leaves forked off one prompt decode through the cascade graph (shared
    prefix once + own pages, merged; FlashInfer's two levels or Dendrite's
    TreeAttention) with the logits of the flat graph and of eager decode; the
    batch of 6 pads to the 8-row bucket; with FlashInfer, a second step reuses
    the shared level's plan."""
    pytest.importorskip("flashinfer")
    from dendrite.kv import BlockPool, KVTree
    from dendrite.model.cuda_graph import CudaGraphDecodeRunner
    from dendrite.model.runner import ModelRunner

    d = build_tiny_model(tmp_path / "m", "llama", seed=4, hidden_size=256, heads=4,
                         kv_heads=2, head_dim=64, num_layers=2, dtype="bfloat16")
    runner = ModelRunner(d, device="cuda", dtype=torch.bfloat16, num_pages=NUM_PAGES,
                         page_size=PAGE_SIZE, attention="flashinfer")
    tree = KVTree(BlockPool(NUM_PAGES - 1, PAGE_SIZE))  # the last page pads graph rows
    rng = np.random.default_rng(2)
    vocab = runner.vocab_size

    def step(nodes, toks):
        counts = np.asarray([len(t) for t in toks], dtype=np.int32)
        starts = np.asarray([tree.num_tokens(n) for n in nodes], dtype=np.int64)
        flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in toks])
        slots, copies = tree.append_batch(np.asarray(nodes, np.int64), counts, flat)
        indptr, indices, last = tree.export_csr(np.asarray(nodes, np.int64))
        qo = np.zeros(len(nodes) + 1, dtype=np.int32)
        np.cumsum(counts, out=qo[1:])
        pos = np.repeat(starts - qo[:-1], counts) + np.arange(len(flat))
        meta = runner.build_metadata(pos, slots, qo, indptr, indices, last)
        if len(copies):
            runner.kv_cache.copy_pages(copies)
        return flat, meta, indices

    root = tree.new_sequence()
    flat, meta, _ = step([root], [rng.integers(0, vocab, 100).tolist()])
    runner.run(flat, meta)
    kids = [int(k) for k in tree.fork(root, 6)]
    suffixes = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, 30, 6)]
    flat, meta, _ = step(kids, suffixes)
    runner.run(flat, meta)

    flat_graphs = CudaGraphDecodeRunner(runner.model, runner.kv_cache, runner.backend,
                                        max_batch_size=8, cascade="never")
    cascade = CudaGraphDecodeRunner(runner.model, runner.kv_cache, runner.backend,
                                    max_batch_size=8, cascade="always",
                                    tree_attention=tree_attention)
    for _ in range(2):
        flat, meta, indices = step(kids, [[int(t)] for t in rng.integers(0, vocab, 6)])
        eager = runner.run(flat, meta)
        lf = flat_graphs.run(flat, meta, host_indices=indices).clone()
        lc = cascade.run(flat, meta, host_indices=indices).clone()
        for ref in (eager, lf):
            assert float(rel_err(lc, ref).max()) < 2e-2
            assert (lc.argmax(-1) == ref.argmax(-1)).float().mean() >= 5 / 6
    assert cascade.stats == {"cascade_steps": 2, "flat_steps": 0}
    assert flat_graphs.stats == {"cascade_steps": 0, "flat_steps": 2}
    cw = cascade._cascade_graphs[8].gw
    if tree_attention:
        assert type(cw).__name__ == "TreeAttention"
        assert cw.last_plan.splits[:6].min() >= 2  # the shared level and the own pages
    else:
        assert cw.plans == 2  # capture + first step; the second step reused the shared plan
    report(f"cascade_graph_{'tree' if tree_attention else 'flashinfer'}", rel_err_eager=float(rel_err(lc, eager).max()),
           rel_err_flat=float(rel_err(lc, lf).max()))


def test_runner_execute_replays_graphs_only_where_they_apply(tmp_path):
    """A runner built with `cuda_graphs=True` decides per step: decode steps whose
    every row samples replay a graph (flat, or cascade for forked leaves), a
    prefill or a step with a non-sampling row runs eagerly; the logits equal an
    eager runner's on the same plans, and the pad page stays out of the pool."""
    pytest.importorskip("flashinfer")
    from dendrite.kv import BlockPool, KVTree
    from dendrite.model.runner import ModelRunner, StepPlan

    d = build_tiny_model(tmp_path / "m", "llama", seed=4, hidden_size=256, heads=4,
                         kv_heads=2, head_dim=64, num_layers=2, dtype="bfloat16")
    kw = dict(device="cuda", dtype=torch.bfloat16, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
              attention="flashinfer")
    graphed = ModelRunner(d, cuda_graphs=True, **kw)
    eager = ModelRunner(graphed.loaded, **kw)
    assert graphed.graphs is not None and eager.graphs is None
    assert graphed.allocatable_pages == NUM_PAGES - 1 and eager.allocatable_pages == NUM_PAGES
    tree = KVTree(BlockPool(graphed.allocatable_pages, PAGE_SIZE))
    rng = np.random.default_rng(3)

    def plan(nodes, toks, sample_rows):
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

    def both(p):
        before = dict(graphed.graphs.stats)
        got = graphed.execute(p).clone()
        want = eager.execute(p)
        assert got.shape == want.shape == (len(p.sample_rows), graphed.vocab_size)
        assert float(rel_err(got, want).max()) < 2e-2
        replayed = sum(graphed.graphs.stats.values()) - sum(before.values())
        return got, replayed

    root = tree.new_sequence()
    _, replayed = both(plan([root], [rng.integers(0, 500, 70).tolist()], [0]))
    assert replayed == 0  # a prefill: eager
    kids = [int(k) for k in tree.fork(root, 5)]  # (the first write copies the shared last page)
    for step in range(4):
        toks = [[int(t)] for t in rng.integers(0, 500, len(kids))]
        rows = [0, 1, 2, 3, 4] if step != 2 else [0, 2, 4]  # step 2: two rows do not sample
        logits, replayed = both(plan(kids, toks, rows))
        assert replayed == (0 if step == 2 else 1)
    assert graphed.graphs.stats["cascade_steps"] + graphed.graphs.stats["flat_steps"] == 3

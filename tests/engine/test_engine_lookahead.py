"""Launching a decode step before the previous step's tokens are read
(`Engine(lookahead=True)`, the CUDA default) changes no token, logprob or
page: leaves that stop meanwhile drop the extra row, and work queued between
steps (forks, new requests, releases) finds a consistent tree."""

import numpy as np
import pytest

from dendrite.engine import Engine
from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

PROMPT = "Let's think step by step. First, second, third."


def _engine(model_dir, lookahead: bool) -> Engine:
    return Engine(model_dir, device="cpu", num_pages=256, lookahead=lookahead)


def _frequent_tokens(model_dir) -> list[int]:
    """Tokens the tiny model samples often from PROMPT: stop tokens that end
    branches at different steps, which the lookahead must then undo."""
    e = _engine(model_dir, False)
    kids = e.new_sequence(PROMPT).fork(8)
    res = e.generate(kids, [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40,
                                           ignore_eos=True) for i in range(8)])
    counts = np.bincount(np.concatenate([r.token_ids for r in res]))
    e.close()
    return [int(t) for t in np.argsort(counts)[::-1][:3]]


def _program(e: Engine, stops: list[int]) -> list:
    """Fork 8 branches with mixed stopping rules, then continue two of the
    finished ones and start a request on another root while steps are queued."""
    root = e.new_sequence(PROMPT)
    kids = root.fork(8)
    stop_text = e.tokenizer.decode([stops[2]]).strip() or e.tokenizer.decode([stops[2]])
    params = []
    for i in range(8):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=30,
                                         stop_token_ids=stops[:2], ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.0, max_tokens=7 + i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=25,
                                         stop=[stop_text], ignore_eos=True))
    first = e.generate(kids, params)
    # Continue from finished leaves (a step may still be queued on the device).
    grand = kids[0].fork(2) + [kids[4]]
    second = e.generate(grand, [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=12,
                                               ignore_eos=True) for i in range(3)])
    other = e.new_sequence("Another root entirely.")
    third = e.generate([other, kids[5]], SamplingParams(temperature=0.0, max_tokens=9,
                                                        ignore_eos=True))
    tokens = [s.tokens for s in kids + grand + [other]]
    for s in kids + grand + [other, root]:
        s.release()
    return [(r.token_ids, r.logprobs, r.finish_reason) for r in first + second + third] + [tokens]


def test_lookahead_changes_nothing(tiny_model_dir):
    stops = _frequent_tokens(tiny_model_dir)
    sync, ahead = _engine(tiny_model_dir, False), _engine(tiny_model_dir, True)
    want, got = _program(sync, stops), _program(ahead, stops)
    for (wt, wl, wr), (gt, gl, gr) in zip(want[:-1], got[:-1]):
        assert gt == wt and gr == wr
        np.testing.assert_allclose(gl, wl, atol=1e-5)
    assert got[-1] == want[-1]  # every leaf's context, token for token
    # The path ran, including leaves that stopped while a step was queued.
    assert ahead.stats["lookahead_steps"] > 10
    assert ahead.stats["lookahead_rows_wasted"] > 0
    assert sync.stats["lookahead_steps"] == 0
    for e in (sync, ahead):
        e.step()  # a queued step, if any, completes with nothing to report
        check_invariants(e.pool, [e.tree], [e.cache])
        e.cache.clear()
        assert e.pool.used == 0, f"leaked {e.pool.used} pages"
        e.close()


def test_release_while_queued(tiny_model_dir):
    """A branch released between steps, with its next step already queued."""
    e = _engine(tiny_model_dir, True)
    root = e.new_sequence(PROMPT)
    kids = root.fork(4)
    handles = [e.submit(k, SamplingParams(temperature=1.0, seed=i, max_tokens=20,
                                          ignore_eos=True)) for i, k in enumerate(kids)]
    for _ in range(5):
        e.step()
    assert e._ahead is not None
    kids[1].release()
    assert handles[1].result.finish_reason == "abort"
    e.run([h for i, h in enumerate(handles) if i != 1])
    assert all(len(handles[i].result.token_ids) == 20 for i in (0, 2, 3))
    assert e.stats["lookahead_rows_wasted"] >= 1
    for s in (kids[0], kids[2], kids[3], root):
        s.release()
    e.step()
    e.cache.clear()
    check_invariants(e.pool, [e.tree], [e.cache])
    assert e.pool.used == 0
    e.close()


@pytest.mark.parametrize("n", [1, 3])
def test_set_last_tokens(tiny_model_dir, n):
    """The native call behind it: ids change, slots and pages do not; bad input
    changes nothing."""
    from dendrite.kv import BlockPool, KVTree

    pool = BlockPool(16, 4)
    tree = KVTree(pool)
    nodes = [tree.new_sequence() for _ in range(n)]
    for i, node in enumerate(nodes):
        tree.append(node, np.arange(5 + i, dtype=np.int32))
    pages = [tree.pages(node).tolist() for node in nodes]
    tree.set_last_tokens(np.asarray(nodes, dtype=np.int64), np.full(n, 99, dtype=np.int32))
    for i, node in enumerate(nodes):
        assert tree.tokens(node).tolist() == list(range(4 + i)) + [99]
        assert tree.pages(node).tolist() == pages[i]
    kid = tree.fork(nodes[0], 1)[0]  # no token of its own yet
    with pytest.raises(ValueError, match="no token of its own"):
        tree.set_last_tokens(np.asarray([nodes[-1], kid], dtype=np.int64),
                             np.asarray([7, 7], dtype=np.int32))
    assert tree.tokens(nodes[-1]).tolist()[-1] == 99

"""Fork consistency at the model level.

Prefill a prompt, fork it into branches that share the prompt's pages (the
partial last page copied on first write, exactly the copy-on-write rows the
native core emits) and sample every branch with the same seed as an unforked
run: each branch must reproduce the unforked tokens, whatever else shares its
batch, and the shared prompt KV must stay untouched.
"""

from __future__ import annotations

import pytest
import torch
from model_paging import Pager, run_step

from dendrite.model.runner import ModelRunner
from dendrite.sampling import Sampler, SamplingParams
from dendrite.tiny_model import build_tiny_model

N = 32
PAGE = 4


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    d = build_tiny_model(tmp_path_factory.mktemp("fork"), "qwen3", seed=21)
    return ModelRunner(d, num_pages=512, page_size=PAGE, attention="reference")


def prompt_ids(runner) -> list[int]:
    ids = [runner.tokenizer.bos_token_id] + runner.tokenizer.encode(
        "Question: Natalia sold clips to 48 of her friends. Answer:"
    )
    assert len(ids) % PAGE, "the prompt must end inside a page so the fork has to copy it"
    return ids


def unforked(runner, prompt, params, n=N) -> list[int]:
    pager, sampler = Pager(runner.num_pages, PAGE), Sampler()
    sid = pager.new()
    logits = run_step(runner, pager, [(sid, prompt)])
    out = []
    for i in range(n):
        out.append(int(sampler(logits, [params], [len(prompt) + i]).token_ids[0]))
        logits = run_step(runner, pager, [(sid, out[-1:])])
    return out


def test_branches_reproduce_unforked_run(runner):
    prompt = prompt_ids(runner)
    params = SamplingParams(temperature=1.5, top_p=0.98, seed=1234)
    other = SamplingParams(temperature=1.5, top_p=0.98, seed=99)
    reference = unforked(runner, prompt, params)
    greedy = unforked(runner, prompt, SamplingParams(temperature=0.0))
    assert reference != greedy, "sampling must be non-trivial for this test to mean anything"

    pager, sampler = Pager(runner.num_pages, PAGE), Sampler()
    parent = pager.new()
    logits = run_step(runner, pager, [(parent, prompt)])
    prompt_pages = list(pager.seqs[parent].pages)
    before = runner.kv_cache.kv[:, :, prompt_pages].clone()

    # Four same-seed branches plus one with another seed and a bystander
    # sequence mid-prefill, so the batch composition differs from the unforked run.
    kids = pager.fork(parent, 5)
    kid_params = [params] * 4 + [other]
    bystander = pager.new()
    pending = list(range(5, 40))
    first = sampler(logits.expand(5, -1), kid_params, [len(prompt)] * 5).token_ids.tolist()
    toks = [[t] for t in first]
    for i in range(1, N):
        batch = [(k, toks[j][-1:]) for j, k in enumerate(kids)]
        if pending:
            batch.append((bystander, pending[:6]))
            pending = pending[6:]
        logits, st = run_step(runner, pager, batch, with_step=True)
        # The first append of every branch copies the shared partial page, once.
        want = [(prompt_pages[-1], len(prompt) % PAGE)] * 5 if i == 1 else []
        assert [(s, n) for s, _, n in st.copies.tolist()] == want
        out = sampler(logits[:5], kid_params, [len(prompt) + i] * 5).token_ids.tolist()
        for j in range(5):
            toks[j].append(out[j])

    for j in range(4):
        assert toks[j] == reference, f"branch {j} diverged from the unforked run"
    assert toks[4] != reference, "a different seed must give a different continuation"
    # Branches wrote only into their own pages: the prompt's KV is intact.
    assert torch.equal(runner.kv_cache.kv[:, :, prompt_pages], before)
    # Full prompt pages are still shared, the partial one was replaced per branch.
    for k in kids:
        assert pager.seqs[k].pages[: len(prompt) // PAGE] == prompt_pages[: len(prompt) // PAGE]
        assert pager.seqs[k].pages[len(prompt) // PAGE] != prompt_pages[-1]


def test_copy_on_write_rows_are_exact(runner):
    """The CoW copy reproduces the parent's partial page bit for bit."""
    prompt = prompt_ids(runner)
    pager = Pager(runner.num_pages, PAGE)
    parent = pager.new()
    run_step(runner, pager, [(parent, prompt)])
    (kid,) = pager.fork(parent, 1)
    st = pager.step([(kid, [7])])
    assert st.copies.shape == (1, 3)
    src, dst, n = st.copies[0].tolist()
    assert n == len(prompt) % PAGE
    runner.kv_cache.copy_pages(st.copies)
    kv = runner.kv_cache.kv
    assert torch.equal(kv[:, :, dst, :n], kv[:, :, src, :n])

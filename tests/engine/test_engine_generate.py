"""Engine generation: greedy tokens equal HF transformers, batching changes nothing,
forked branches equal unforked runs, the prefix cache is reused, stops work."""

import numpy as np
import pytest
import torch

from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox", "Question: Natalia sold clips", "{\"name\": \"Ada\", ",
           "Let's think step by step. First, second, third. Yes or no? red green blue."]


def hf_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 2
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_batched_equals_hf(make_engine, tiny_model_dir):
    e = make_engine()
    seqs = [e.new_sequence(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    results = e.generate(seqs, params)
    for seq, p, r in zip(seqs, PROMPTS, results):
        ids = e.tokenizer.encode(p)
        assert r.token_ids == hf_greedy(tiny_model_dir, ids, 32)
        assert r.finish_reason == "length" and not r.complete
        assert seq.tokens == ids + r.token_ids
    # every request ran in shared steps, not one forward per request
    assert e.stats["steps"] <= 32 + 1
    check_invariants(e.pool, [e.tree], [e.cache])


def test_sampled_batch_composition_does_not_matter(make_engine):
    e = make_engine()
    p = [SamplingParams(temperature=1.0, top_k=50, seed=7 + i, max_tokens=24, ignore_eos=True)
         for i in range(4)]
    together = e.generate([e.new_sequence(x) for x in PROMPTS], p)
    alone = [e.generate(e.new_sequence(x), q)[0] for x, q in zip(PROMPTS, p)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_fork_branches_equal_unforked_run(make_engine):
    e = make_engine()
    params = SamplingParams(temperature=1.2, seed=11, max_tokens=40, ignore_eos=True)
    ref = e.generate(e.new_sequence(PROMPTS[1]), params)[0]
    root = e.new_sequence(PROMPTS[1])
    kids = root.fork(4)
    results = e.generate(kids, params)
    for r in results:
        assert r.token_ids == ref.token_ids
        assert np.allclose(r.logprobs, ref.logprobs, atol=1e-5)
    # and a branch with another seed diverges
    other = root.fork(1)[0]
    r2 = e.generate(other, SamplingParams(temperature=1.2, seed=12, max_tokens=40,
                                          ignore_eos=True))[0]
    assert r2.token_ids != ref.token_ids
    check_invariants(e.pool, [e.tree], [e.cache])


def test_fork_is_o1_and_shares_pages(make_engine):
    e = make_engine(num_pages=64)
    root = e.new_sequence(" ".join(["tree"] * 300))  # ~19 pages
    e.flush([root])
    used = e.pool.used
    kids = root.fork(16)
    assert e.pool.used == used  # no KV bytes moved or allocated by fork
    e.generate(kids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    # each child owns at most its copied partial page plus its new page
    assert e.pool.used - used <= 2 * len(kids)


def test_continue_parent_after_fork(make_engine):
    e = make_engine()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = e.new_sequence(PROMPTS[0])
    kid = a.fork(1)[0]
    a.append_text(" jumps")  # the parent continues on a fresh child node
    b = e.new_sequence(PROMPTS[0] + " jumps")
    ra, rb = e.generate([a, b], params)
    assert ra.token_ids == rb.token_ids
    rk = e.generate(kid, params)[0]
    rc = e.generate(e.new_sequence(PROMPTS[0]), params)[0]
    assert rk.token_ids == rc.token_ids


def test_prefix_cache_reuse_gives_same_tokens(make_engine):
    e = make_engine()
    prompt = " ".join(PROMPTS) * 3
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    s1 = e.new_sequence(prompt)
    r1 = e.generate(s1, params)[0]
    s1.release()  # inserted into the radix cache
    s2 = e.new_sequence(prompt)
    assert e.stats["prefix_tokens_reused"] >= 16
    r2 = e.generate(s2, params)[0]
    assert r2.token_ids == r1.token_ids
    check_invariants(e.pool, [e.tree], [e.cache])


def test_stop_strings_and_eos(make_engine):
    e = make_engine()
    free = e.generate(e.new_sequence(PROMPTS[3]),
                      SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    r = e.generate(e.new_sequence(PROMPTS[3]),
                   SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.complete
    assert stop not in r.text and text.startswith(r.text)
    eos = sorted(e.eos_token_ids)[0]
    r = e.generate(e.new_sequence(PROMPTS[3]),
                   SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free.token_ids[5]],
                                  ignore_eos=True))[0]
    assert r.token_ids == free.token_ids[:6] and r.finish_reason == "stop"
    assert eos not in r.token_ids


def test_release_mid_generation_leaks_nothing(make_engine):
    e = make_engine()
    seqs = [e.new_sequence(p) for p in PROMPTS]
    hs = [e.submit(s, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
          for s in seqs]
    for _ in range(5):
        e.step()
    seqs[1].release()
    assert hs[1].done and hs[1].result.finish_reason == "abort"
    e.run([h for i, h in enumerate(hs) if i != 1])
    check_invariants(e.pool, [e.tree], [e.cache])


def test_branch_continues_after_eos(make_engine):
    e = make_engine()
    probe = e.generate(e.new_sequence(PROMPTS[1]),
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0]
    tok = probe.token_ids[0]
    # Make the greedy next token an EOS id: the request ends with "eos" at once.
    e.eos_token_ids.add(tok)
    try:
        s = e.new_sequence(PROMPTS[1])
        r = e.generate(s, SamplingParams(temperature=0, max_tokens=4))[0]
    finally:
        e.eos_token_ids.discard(tok)
    assert r.finish_reason == "eos" and r.token_ids == []
    assert s.pending, "the branch keeps a pending token after EOS"
    kids = s.fork(2)  # the branch can be forked and continued
    rs = e.generate(kids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert rs[0].token_ids == rs[1].token_ids and rs[0].token_ids[0] == tok
    check_invariants(e.pool, [e.tree], [e.cache])

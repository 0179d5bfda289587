"""Rejected branches give their pages back in the same step; nothing leaks after a
run, a cancel or an error; the on/off rule; stats."""

import pytest
from test_spec_exactness import REPEAT

from dendrite.sampling import SamplingParams
from dendrite.speculative import NgramDrafter, SpeculativeConfig
from dendrite.speculative.tree import DraftTree


def test_rejected_forks_are_released_in_the_step(make_engine, other_dir):
    """A 3-wide tree forks each branch 3 times per step; after every step the
    pool holds what the plain run holds (the same tokens, the same pages)."""
    p = SamplingParams(temperature=0, max_tokens=12)
    plain = make_engine(prefix_cache=False)
    spec = make_engine(prefix_cache=False, speculative=SpeculativeConfig(
        method="model", draft_model=str(other_dir), width=3, num_draft=2, break_even=0.0))
    seqs = []
    for e in (plain, spec):
        s = e.new_sequence(REPEAT)
        e.submit(s, p)
        seqs.append(s)
    while not seqs[1].handle.done:
        spec.step()
        assert spec.tree.validate() == []
        # Only the branch's own node path is live: no draft fork survives a step.
        assert spec.tree.num_live_nodes == spec.tree.depth(seqs[1].node) + 1
    plain.run([seqs[0].handle])
    assert seqs[1].handle.result.token_ids == seqs[0].handle.result.token_ids
    assert spec.pool.used == plain.pool.used
    assert spec.stats["spec_steps"] > 0


def test_cancel_mid_run_leaks_nothing(make_engine):
    e = make_engine(speculative=SpeculativeConfig(num_draft=4, width=2))
    kids = e.new_sequence(REPEAT).fork(3)
    hs = [e.submit(k, SamplingParams(temperature=0, max_tokens=40)) for k in kids]
    for _ in range(3):
        e.step()
    assert e.cancel(hs[1])
    e.run([hs[0], hs[2]])
    assert hs[1].result.finish_reason == "abort"
    assert e.tree.validate() == []
    # The cancelled branch goes on from where it stopped, as after any request.
    r = e.generate(kids[1], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(r.token_ids) == 4


class Exploding(NgramDrafter):
    """Prompt lookup that fails on its third call (a drafter bug)."""

    calls = 0

    def propose(self, *args):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("drafter exploded")
        return super().propose(*args)


class OutOfVocab(NgramDrafter):
    def propose(self, keys, contexts, shape, depths):
        return [DraftTree([10 ** 6], [-1], [1.0]) for _ in keys]


def test_drafter_error_leaves_the_engine_consistent(make_engine):
    e = make_engine(speculative=SpeculativeConfig(drafter=Exploding(), num_draft=3))
    s = e.new_sequence(REPEAT)
    h = e.submit(s, SamplingParams(temperature=0, max_tokens=30))
    with pytest.raises(RuntimeError, match="drafter exploded"):
        e.run([h])
    assert e.tree.validate() == [] and s.pending  # the branch can go on
    e.run([h])  # the fourth call drafts again
    plain = make_engine()
    want = plain.generate(plain.new_sequence(REPEAT),
                          SamplingParams(temperature=0, max_tokens=30))[0]
    assert h.result.token_ids == want.token_ids


def test_draft_token_outside_the_vocabulary_is_a_clear_error(make_engine):
    e = make_engine(speculative=SpeculativeConfig(drafter=OutOfVocab()))
    s = e.new_sequence(REPEAT)
    h = e.submit(s, SamplingParams(temperature=0, max_tokens=5))
    with pytest.raises(ValueError, match="drafter OutOfVocab proposed token id 1000000"):
        e.run([h])
    assert e.tree.validate() == []


def test_rule_turns_speculation_off_for_wide_batches(make_engine):
    e = make_engine(speculative=SpeculativeConfig(num_draft=3, max_rows=2))
    kids = e.new_sequence(REPEAT).fork(4)
    e.generate(kids, SamplingParams(temperature=0, max_tokens=8))
    assert e.stats["spec_steps"] == 0 and e.stats["spec_off_steps"] > 0


def test_off_steps_count_launched_ahead_steps(make_engine):
    """A plain step launched ahead (lookahead) is a speculation-off step too: the
    count is the same with and without lookahead."""
    counts = []
    for lookahead in (False, True):
        e = make_engine(speculative=SpeculativeConfig(num_draft=3, max_rows=2),
                        lookahead=lookahead)
        kids = e.new_sequence(REPEAT).fork(4)
        e.generate(kids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        counts.append((e.stats["spec_off_steps"], e.stats["lookahead_steps"]))
    (off_plain, _), (off_ahead, launched) = counts
    assert launched > 0 and off_ahead == off_plain > 0


def test_rule_pauses_a_branch_whose_drafts_fail(make_engine, other_dir):
    """A draft model that is never right: after the first steps the branch
    drafts only every `probe_every` steps."""
    e = make_engine(speculative=SpeculativeConfig(method="model", draft_model=str(other_dir),
                                                  num_draft=3, probe_every=4))
    e.generate(e.new_sequence(REPEAT), SamplingParams(temperature=0, max_tokens=30))
    assert e.stats["spec_off_steps"] >= 15
    assert e.stats["spec_steps"] <= 10


def test_verify_budget_caps_every_step(make_engine):
    """max_verify=10 over 4 branches: 2 tokens per branch, a 1-token chain each;
    no speculative step verifies more than 10 tokens."""
    e = make_engine(speculative=SpeculativeConfig(num_draft=4, width=2, max_verify_tokens=10,
                                                  break_even=0.0))
    kids = e.new_sequence(REPEAT).fork(4)
    hs = [e.submit(k, SamplingParams(temperature=0, max_tokens=12)) for k in kids]
    while not all(h.done for h in hs):
        before, spec = e.stats["forward_tokens"], e.stats["spec_steps"]
        e.step()
        if e.stats["spec_steps"] > spec:
            assert e.stats["forward_tokens"] - before <= 10
    assert e.stats["spec_steps"] > 0


@pytest.mark.parametrize("pages", [10, 12])
def test_short_pool_falls_back_to_plain_steps(make_engine, target_dir, pages):
    """A pool too small for the draft forks: the step runs plain (the plain step
    preempts as usual, with 10 pages; speculation never does) and the tokens
    are unchanged."""
    p = [SamplingParams(temperature=0, max_tokens=20)] + [
        SamplingParams(temperature=0.8, seed=s, max_tokens=20) for s in range(3)]
    want = None
    for spec in (None, SpeculativeConfig(method="model", draft_model=str(target_dir),
                                         width=2, num_draft=3)):
        e = make_engine(num_pages=pages, prefix_cache=False, speculative=spec)
        kids = e.new_sequence(REPEAT[:120]).fork(4)
        got = [r.token_ids for r in e.generate(kids, p)]
        assert e.tree.validate() == []
        if want is None:
            want = got
            continue
        assert got == want
        if pages == 10:
            assert e.stats["preemptions"] > 0
        else:
            assert e.stats["spec_steps"] > 0


class Repeats(NgramDrafter):
    """Proposes the branch's last token k times: always a draft, so every step
    the rule allows is a speculative one (and counted)."""

    def propose(self, keys, contexts, shape, depths):
        return [DraftTree([int(c[-1])] * d, list(range(-1, d - 1)), [1.0] * d)
                for c, d in zip(contexts, depths)]


@pytest.mark.parametrize("lookahead", [False, True], ids=["eager", "lookahead"])
def test_wide_run_does_not_speculate_in_its_tail(make_engine, lookahead):
    """16 branches (default max_rows 8) that finish one after another: once 8
    or fewer are left the row count alone would let them speculate (the H100
    run took 16 such steps, 0.84x of plain); a branch that ran in a wide step
    never does. The same staggered run with the rule lifted speculates, and a
    narrow request after the wide run still speculates."""
    params = [SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True)
              for i in range(16)]

    def run(e):
        kids = e.new_sequence(REPEAT).fork(16)
        return [r.token_ids for r in e.generate(kids, params)]

    wide = make_engine(speculative=SpeculativeConfig(drafter=Repeats(), num_draft=3),
                       lookahead=lookahead)
    lifted = make_engine(speculative=SpeculativeConfig(drafter=Repeats(), num_draft=3,
                                                       max_rows=16), lookahead=lookahead)
    plain = make_engine(lookahead=lookahead)
    assert run(wide) == run(plain)
    assert wide.stats["spec_steps"] == 0
    assert run(lifted) == run(plain)
    assert lifted.stats["spec_steps"] > 0
    wide.generate(wide.new_sequence(REPEAT), SamplingParams(temperature=0, max_tokens=8))
    assert wide.stats["spec_steps"] > 0


def test_branch_outliving_a_wide_run_speculates_after_the_cooldown(make_engine):
    """One branch of 16 runs long after the other 15 stopped: after
    WIDE_COOLDOWN plain steps alone it speculates again (a request that
    outlives a burst is not kept plain for good), and its tokens are the
    plain run's."""
    from dendrite.speculative.step import WIDE_COOLDOWN

    long = WIDE_COOLDOWN + 24
    params = [SamplingParams(temperature=0, max_tokens=long if i == 5 else 3, ignore_eos=True)
              for i in range(16)]

    def run(e):
        kids = e.new_sequence(REPEAT).fork(16)
        hs = [e.submit(k, p) for k, p in zip(kids, params)]
        first_spec = None
        while not all(h.done for h in hs):
            before = e.stats.get("spec_steps", 0)
            e.step()
            if first_spec is None and e.stats.get("spec_steps", 0) > before:
                first_spec = len(hs[5].token_ids)
        return [h.token_ids for h in hs], first_spec

    spec = make_engine(speculative=SpeculativeConfig(drafter=Repeats(), num_draft=3))
    plain = make_engine()
    got, first_spec = run(spec)
    assert got == run(plain)[0]
    assert first_spec is not None and first_spec >= WIDE_COOLDOWN

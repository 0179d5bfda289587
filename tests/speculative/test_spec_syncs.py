"""A speculative step reads the device back once: the draws, their logprobs and
(for drawn drafts) the target and draft distributions come over in one
transfer, and no host->device copy of the step blocks on the queued forward.

Counted on this CPU by benchmarks/profile_spec_step.py's torch function mode,
which tracks which tensors would live on a GPU (see its `SyncCounter`). Only
the step's reads are asserted, but the runner's own (dendrite/model/: its
eager CPU path; a CUDA verify step replays a graph), and this package's
blocking host->device copies (the sampler's unfused path, which CUDA does
not take for these parameters, makes its own).
"""

import sys
from pathlib import Path

import pytest
from test_spec_exactness import REPEAT

from dendrite.sampling import SamplingParams
from dendrite.speculative import NgramDrafter, SpeculativeConfig
from dendrite.speculative.tree import DraftTree

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from profile_spec_step import SyncCounter, instrumented


class Repeats(NgramDrafter):
    """The branch's last token, k deep; `width` first tokens (then chains)."""

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.width = width

    def propose(self, keys, contexts, shape, depths):
        out = []
        for c, d in zip(contexts, depths):
            t = DraftTree()
            for w in range(self.width if d else 0):
                node = t.add(-1, (int(c[-1]) + w) % 64)
                for _ in range(d - 1):
                    node = t.add(node, int(c[-1]))
            out.append(t)
        return out


def own_reads(counter: SyncCounter) -> tuple[int, int]:
    """(device->host reads of the step but the runner's own, blocking host->device
    copies made by this package)."""
    reads = sum(n for site, n in counter.sites.items()
                if not site.startswith(("(H2D", "model/")))
    h2d = sum(n for site, n in counter.sites.items()
              if site.startswith("(H2D, blocking) speculative/"))
    return reads, h2d


def count_spec_steps(engine, handles, counter):
    """Step until done; per speculative step, this package's (reads, blocking H2D)."""
    per_step = []
    while not all(h.done for h in handles):
        counter.sites.clear()
        before = engine.stats["spec_steps"]
        with counter:
            engine.step()
        if engine.stats["spec_steps"] > before:
            per_step.append(own_reads(counter))
    return per_step


@pytest.mark.parametrize("branches,width,temperature", [
    (1, 1, 0.0), (4, 1, 0.0), (3, 2, 0.0), (4, 1, 0.8)],
    ids=["chain", "4-chains", "forked-trees", "sampled"])
def test_proposed_drafts_one_read_per_step(make_engine, branches, width, temperature):
    e = make_engine(speculative=SpeculativeConfig(drafter=Repeats(width), num_draft=3,
                                                  width=width, break_even=0.0))
    kids = e.new_sequence(REPEAT).fork(branches) if branches > 1 else [e.new_sequence(REPEAT)]
    hs = [e.submit(k, SamplingParams(temperature=temperature, seed=i, max_tokens=12))
          for i, k in enumerate(kids)]
    counter = SyncCounter()
    with instrumented(counter):
        steps = count_spec_steps(e, hs, counter)
    assert steps and all(s == (1, 0) for s in steps), steps


def test_drawn_drafts_one_read_per_step_and_level(make_engine, target_dir):
    """Drafts drawn by a draft model and verified by rejection sampling: one
    read for the verification (it was one per test and per uniform), plus one
    per draft level (the draft's tokens go into its KV tree on the host)."""
    k = 3
    e = make_engine(speculative=SpeculativeConfig(
        method="model", draft_model=str(target_dir), num_draft=k, break_even=0.0,
        draft_temperature=0.5))  # (q is not p: drafts are accepted and rejected)
    kids = e.new_sequence(REPEAT).fork(2)
    hs = [e.submit(c, SamplingParams(temperature=1.0, seed=i, max_tokens=12))
          for i, c in enumerate(kids)]
    counter = SyncCounter()
    with instrumented(counter):
        steps = count_spec_steps(e, hs, counter)
    assert e.stats["spec_drafted"] > e.stats["spec_accepted"] > 0  # both outcomes ran
    assert steps and all(h2d == 0 and reads <= 1 + k for reads, h2d in steps), steps


def test_counter_sees_a_read(make_engine):
    """The counter is not blind: a device read in the step is counted."""
    e = make_engine(speculative=SpeculativeConfig(drafter=Repeats(), num_draft=2,
                                                  break_even=0.0))
    h = e.submit(e.new_sequence(REPEAT), SamplingParams(temperature=0, max_tokens=6))
    sampler = e.sampler

    def reading_sampler(logits, *a, **kw):
        logits.sum().item()  # a device->host read, from this package's frame below
        return sampler(logits, *a, **kw)
    e.sampler = reading_sampler
    counter = SyncCounter()
    with instrumented(counter):
        steps = count_spec_steps(e, [h], counter)
    e.sampler = sampler
    assert steps and all(reads == 2 for reads, _ in steps), steps  # the step's one + this

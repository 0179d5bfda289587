"""The measured on/off rule: `StepCosts` averages step wall times by kind and
width, and the engine feeds it its plain decode steps and its speculative ones."""

import pytest

from dendrite.sampling import SamplingParams
from dendrite.speculative import SpeculativeConfig
from dendrite.speculative.costs import StepCosts

from test_spec_exactness import REPEAT


def feed(costs, steps, t=0.0):
    """`steps`: (kind, width, seconds) in order; returns the clock."""
    costs.note("plain", 1, now=t)  # starts the clock
    for kind, width, dt in steps:
        t += dt
        costs.note(kind, width, now=t)
    return t


def test_ratio_of_measured_step_times_per_width():
    c = StepCosts(fallback=2.7, alpha=0.5, min_samples=3)
    feed(c, [("plain", 1, 0.010)] * 4 + [("spec", 1, 0.015)] * 3 + [("plain", 4, 0.020)] * 3)
    assert c.seconds("plain", 1) == pytest.approx(0.010)
    assert c.break_even(1) == pytest.approx(1.5)
    assert c.break_even(4) == 2.7  # no speculative step of 4 branches timed yet
    assert c.seconds("spec", 4) is None


def test_fallback_until_each_kind_has_enough_samples():
    c = StepCosts(fallback=2.0, min_samples=3)
    feed(c, [("plain", 1, 0.01)] * 5 + [("spec", 1, 0.03)] * 2)
    assert c.break_even(1) == 2.0
    feed(c, [("spec", 1, 0.03)], t=1.0)  # (the new clock's first note is the plain one)
    assert c.break_even(1) == pytest.approx(3.0)


def test_pauses_are_not_step_costs():
    c = StepCosts(fallback=2.0, alpha=0.5, min_samples=1, gap=4.0)
    t = feed(c, [("plain", 1, 0.01)] * 3 + [("spec", 1, 0.02)] * 3)
    # The caller paused for a second before the next step ended: dropped.
    c.note("plain", 1, now=t + 1.0)
    assert c.seconds("plain", 1) == pytest.approx(0.01)
    # skip(): the interval up to the next note counts for nothing.
    c.skip()
    c.note("spec", 1, now=t + 5.0)
    assert c.seconds("spec", 1) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="kind"):
        c.note("prefill", 1)


def test_an_inflated_first_sample_decays():
    c = StepCosts(fallback=2.0, alpha=0.2, min_samples=3)
    feed(c, [("plain", 1, 0.5)] + [("plain", 1, 0.01)] * 40)  # a compile, then steady steps
    assert c.seconds("plain", 1) < 0.012


def test_rule_is_fixed_on_the_cpu_or_when_configured(make_engine):
    e = make_engine(speculative=SpeculativeConfig(method="ngram", num_draft=4))
    assert e._spec.costs is None and e.stats["spec_break_even"] == 2.0
    e = make_engine(speculative=SpeculativeConfig(method="ngram", num_draft=4, break_even=1.3))
    assert e._spec.costs is None and e._spec.break_even == 1.3


def test_engine_times_its_plain_and_speculative_steps(make_engine):
    """With a meter attached (as on CUDA), a run times both kinds of step at its
    width, and the rule's break-even is their ratio; the tokens are the plain run's."""
    p = SamplingParams(temperature=0, max_tokens=40)
    plain = make_engine()
    want = [r.token_ids for r in plain.generate([plain.new_sequence(REPEAT)], p)]
    e = make_engine(speculative=SpeculativeConfig(method="ngram", num_draft=4))
    e._spec.costs = StepCosts(fallback=2.0, min_samples=1)
    got = [r.token_ids for r in e.generate([e.new_sequence(REPEAT)], p)]
    assert got == want
    c = e._spec.costs
    assert e.stats["spec_steps"] > 0
    assert c.seconds("spec", 1) is not None and c.seconds("plain", 1) is not None
    # The rule decided with a measured ratio, not the fallback (read before the
    # last step's own time was folded in, hence not equal to the final ratio).
    assert e.stats["spec_break_even"] != 2.0 and e.stats["spec_break_even"] > 0

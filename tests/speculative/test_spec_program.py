"""The DSL run option: `prog.run(engine, speculative=...)` speculates for that run
only, with the same results as a plain run (forks, seeds, regex gens)."""

import pytest
from test_spec_exactness import REPEAT

from dendrite.program import program
from dendrite.speculative import SpeculativeConfig


@program
def branches(s, text: str, n: int = 3):
    s += text
    kids = s.fork(n)
    for i, k in enumerate(kids):
        k.gen("more", max_tokens=12, temperature=0.8 if i else 0)
    s2 = kids[0]
    s2 += " so:"
    s2.gen("word", max_tokens=6, regex=r" (quick|brown|fox|lazy|dog)+")
    return [k["more"] for k in kids] + [s2["word"]]


def test_run_option_gives_the_plain_results_and_is_restored(make_engine):
    e = make_engine()
    plain = branches.run(e, text=REPEAT, seed=4).value
    steps = e.stats["steps"]
    spec = branches.run(e, text=REPEAT, seed=4, speculative="ngram:k=4,width=2").value
    assert spec == plain
    assert e.stats["spec_steps"] > 0 and e.stats["steps"] - steps > 0
    assert e._spec is None  # the engine's own setting is back


def test_run_option_off_and_errors(make_engine):
    e = make_engine(speculative=SpeculativeConfig(num_draft=3))
    own = e._spec
    branches.run(e, text=REPEAT, seed=1, speculative="off")
    assert e._spec is own
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        branches.run(e, text=REPEAT, speculative="fast")
    assert e._spec is own

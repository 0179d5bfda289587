"""`select(name, choices=[...])` ranks every choice by the model's logprob of its
tokens after the prompt (SGLang's select): scores equal HF transformers' for
each full prompt + choice, all choices scored in one batched engine step."""

from __future__ import annotations

import math

import pytest
import torch

import dendrite.program as dp
from dendrite.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PROMPT = "Q: What is the capital of France? A:"
# Different token lengths, so sum and mean can rank differently.
CHOICES = [" Paris", " Banana Republic of Zanzibar", " the city of lights and love", " no"]


@pytest.fixture(scope="module")
def hf_choice_logprobs(tiny_model_dir):
    """(prompt ids, choice ids) -> HF's logprob of each choice token after the prompt."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                           dtype=torch.float32).eval()

    def run(prompt_ids: list[int], choice_ids: list[int]) -> list[float]:
        ids = prompt_ids + choice_ids
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        p = len(prompt_ids)
        return [float(lp[p + i - 1, t]) for i, t in enumerate(choice_ids)]

    return run


def hf_scores(engine, hf_choice_logprobs, prompt: str, choices: list[str]):
    prompt_ids = engine.encode(prompt)
    per = [hf_choice_logprobs(prompt_ids, engine.encode(c, add_bos=False)) for c in choices]
    return per, [sum(x) for x in per], [sum(x) / len(x) for x in per]


@pytest.mark.parametrize("method", ["mean", "sum", "token_length_normalized"])
def test_select_ranks_choices_as_hf_in_one_step(make_engine, hf_choice_logprobs, method):
    e = make_engine()

    @dp.program
    def prog(s):
        s += PROMPT
        s += dp.select("city", choices=CHOICES, method=method)
        return s["city"]

    r = prog.run(e, seed=0)
    per, sums, means = hf_scores(e, hf_choice_logprobs, PROMPT, CHOICES)
    assert len({len(x) for x in per}) >= 3  # choices of different token lengths
    want = sums if method == "sum" else means
    meta = r.state.meta_info("city")
    assert meta["method"] == ("sum" if method == "sum" else "mean")
    torch.testing.assert_close(torch.tensor(meta["scores"]), torch.tensor(want),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(meta["sum_logprobs"]), torch.tensor(sums),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(meta["mean_logprobs"]), torch.tensor(means),
                               atol=1e-4, rtol=0)
    for got, ref in zip(meta["token_logprobs"], per):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)
    best = max(range(len(want)), key=lambda i: want[i])
    assert r.value == CHOICES[best] and meta["index"] == best
    assert r.state.text == PROMPT + CHOICES[best]
    assert math.isclose(r.state.sum_logprob, sums[best], abs_tol=1e-4)
    # One step prefills the prompt, one scores every token of every choice.
    assert e.stats["steps"] == 2
    assert not e._live  # every child, the losers included, was released


def test_sum_and_mean_can_disagree_and_each_follows_its_own_ranking(make_engine,
                                                                    hf_choice_logprobs):
    e = make_engine()
    _, sums, means = hf_scores(e, hf_choice_logprobs, PROMPT, CHOICES)
    picks = {}
    for method in ("sum", "mean"):
        @dp.program
        def prog(s, how):
            s += PROMPT
            s += dp.select("city", choices=CHOICES, method=how)
            return s["city"]

        picks[method] = prog.run(e, how=method, seed=0).value
    assert picks["sum"] == CHOICES[max(range(4), key=lambda i: sums[i])]
    assert picks["mean"] == CHOICES[max(range(4), key=lambda i: means[i])]
    # A longer choice pays for every token under "sum": the shortest wins there.
    assert picks["sum"] != picks["mean"]


def test_the_winning_branch_continues_with_its_scored_kv(make_engine):
    e = make_engine()

    @dp.program
    def prog(s):
        s += PROMPT
        s += dp.select("city", choices=CHOICES)
        s += dp.gen("more", max_tokens=6, temperature=0.0, ignore_eos=True)
        return s["city"], s["more"]

    r = prog.run(e, seed=0)
    city, more = r.value
    # The same greedy continuation from a fresh sequence of the same token ids.
    ids = e.encode(PROMPT) + e.encode(city, add_bos=False)
    ref = e.generate(e.new_sequence(ids), SamplingParams(temperature=0.0, max_tokens=6,
                                                         ignore_eos=True))[0]
    assert more == ref.text


def test_forked_states_select_batched_together(make_engine):
    e = make_engine()

    @dp.program
    def prog(s):
        s += "Q: pick one. A:"
        kids = s.fork(3)
        for i, k in enumerate(kids):
            k += f" ({i})"
        kids += dp.select("c", choices=[" yes", " no thanks", " maybe so sure"])
        return [k["c"] for k in kids]

    r = prog.run(e, seed=0)
    assert all(c in (" yes", " no thanks", " maybe so sure") for c in r.value)
    # The prompt's prefill, the children's own texts' (before each forks per
    # choice), then one step scoring all 3 x 3 choices.
    assert e.stats["steps"] == 3


def test_constrained_mode_is_kept(engine):
    @dp.program
    def prog(s):
        s += PROMPT
        s += dp.select("city", choices=CHOICES, method="constrained", temperature=1.0)
        return s["city"]

    r = prog.run(engine, seed=3)
    assert r.value in CHOICES
    # A constrained select is a gen: its meta info is a gen's, not a ranking.
    meta = r.state.meta_info("city")
    assert "scores" not in meta and meta["matched_stop"] is None
    with pytest.raises(KeyError, match="no select meta info"):
        r.state.meta_info("nothing")


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"choices": []}, ValueError, "choices is empty"),
    ({"choices": ["a", ""]}, ValueError, "choice 1 is empty"),
    ({"choices": "ab"}, TypeError, "list of strings"),
    ({"choices": ["a"], "method": "max"}, ValueError, "method must be one of"),
    ({"choices": ["a"], "temperature": 0.5}, TypeError, "method='constrained'"),
])
def test_select_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dp.select("x", **kwargs)


def test_select_of_states_refuses_choice_options(engine):
    with pytest.raises(TypeError, match="no gen options, choices or method"):
        dp.select([], method="sum")


# ---- the .dendrite DSL: ``select x(choices=[...], method=...)`` ----

SCRIPT = '''
program pick(method="mean"):
    "Q: What is the capital of France? A:"
    select city(choices=[" Paris", " Banana Republic of Zanzibar",
                         " the city of lights and love", " no"], method=method)
    return city
'''


@pytest.mark.parametrize("method", ["mean", "sum"])
def test_dsl_select_ranks_like_the_python_api(make_engine, hf_choice_logprobs, method):
    from dendrite import dsl

    e = make_engine()
    r = dsl.loads(SCRIPT, "pick.dendrite").run(e, method=method, seed=0)
    _, sums, means = hf_scores(e, hf_choice_logprobs, PROMPT, CHOICES)
    want = sums if method == "sum" else means
    assert r.value == CHOICES[max(range(4), key=lambda i: want[i])]
    torch.testing.assert_close(torch.tensor(r.state.meta_info("city")["scores"]),
                               torch.tensor(want), atol=1e-4, rtol=0)
    assert e.stats["steps"] == 2


def test_dsl_select_constrained_takes_gen_options(engine):
    from dendrite import dsl

    src = ('program p():\n    "Colour:"\n'
           '    select c(choices=[" red", " green"], method="constrained", temperature=1.0)\n'
           '    return c\n')
    assert dsl.loads(src, "p.dendrite").run(engine, seed=1).value in (" red", " green")


@pytest.mark.parametrize("line,match", [
    ('select c(method="sum")', r"t.dendrite:3:\d+: .*needs choices"),
    ('select c(choices=[])', r"t.dendrite:3:\d+: .*choices is empty"),
    ('select c(choices=["a"], method="best")', r"t.dendrite:3:\d+: .*method must be one of"),
    ('select c(choices=["a"], method="sum", temperature=0.5)',
     r"t.dendrite:3:\d+: .*'temperature' needs method=\"constrained\""),
    ('select c(choices=["a"], choises=1)', r"t.dendrite:3:\d+: .*unknown select option 'choises'"),
])
def test_dsl_select_errors_point_at_the_option(line, match):
    from dendrite import dsl

    src = f'program p():\n    "Q:"\n    {line}\n    return c\n'
    with pytest.raises((dsl.ScriptSyntaxError, dsl.ScriptNameError), match=match):
        dsl.loads(src, "t.dendrite")


def test_programs_md_select_example_runs(make_engine):
    """The select example of docs/programs.md, run as written."""
    from pathlib import Path

    import dendrite

    doc = (Path(__file__).resolve().parents[2] / "docs" / "programs.md").read_text()
    section = doc.split("## Choosing among fixed answers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {"dendrite": dendrite, "program": dp.program}
    exec(compile(code, "programs.md", "exec"), ns)
    city, scores = ns["capital"].run(make_engine(), seed=0).value
    assert city in (" Paris", " Rome", " Banana Republic") and len(scores) == 3
    assert city == [" Paris", " Rome", " Banana Republic"][scores.index(max(scores))]

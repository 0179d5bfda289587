"""State API on a real engine: text, gen + captures, constraints, fork inheritance, release."""

from __future__ import annotations

import re

import pytest

import dendrite.program as dp
from dendrite.program import GenOptionError, StateReleasedError


def test_text_gen_and_captures(engine):
    @dp.program
    def prog(s):
        s += "Question: 1+1?\nAnswer:"
        s.gen("answer", max_tokens=5, temperature=0.0, ignore_eos=True)
        return s["answer"]

    r = prog.run(engine, seed=0)
    s = r.state
    assert isinstance(r.value, str) and r.value == s["answer"] == r["answer"]
    assert s.text.startswith("Question: 1+1?\nAnswer:")
    assert s.text.endswith(r.value)
    assert s.num_gen_tokens == 5 and s.finish_reason == "length"
    assert s.logprob == pytest.approx(s.sum_logprob / 5)
    assert s.sum_logprob < 0
    node = r.tree[s.id]
    assert [seg.kind for seg in node.segments] == ["text", "gen"]
    assert node.gen_tokens == 5 and node.captures == {"answer": r.value}


def test_stop_string_is_cut_from_the_capture_and_the_text(engine):
    # (Its tokens stay in the sequence; see tests/program/test_program_stream.py.)
    @dp.program
    def prog(s):
        s += "Say:"
        s.gen("x", stop=" ", max_tokens=40, temperature=1.0, ignore_eos=True)

    r = prog.run(engine, seed=0)
    s = r.state
    assert s.finish_reason == "stop"  # a space is all but certain in 40 tokens
    assert " " not in s["x"] and s.meta_info("x")["matched_stop"] == " "
    assert s.text.startswith("Say:" + s["x"]) and not s.text.endswith(" ")


def test_constraints(engine):
    @dp.program
    def prog(s):
        s += "Pick one:"
        s.gen("c", choices=["yes", "no", "maybe"], temperature=1.0)
        s += " Number:"
        s.gen("n", regex=r"[0-9]{3}")
        s += " JSON:"
        s.gen("j", json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                "required": ["a"]}, max_tokens=24)

    r = prog.run(engine, seed=1)
    assert r["c"] in {"yes", "no", "maybe"}
    assert re.fullmatch(r"[0-9]{3}", r["n"])
    assert r["j"].lstrip().startswith("{")


def test_sglang_style_appends_and_select_choices(engine):
    @dp.program
    def prog(s):
        s += "Is the sky blue? "
        s += dp.select("yn", choices=["yes", "no"])
        s += [" Because ", dp.gen("why", max_tokens=3)]
        return s["yn"], s["why"]

    r = prog.run(engine, seed=2)
    yn, why = r.value
    assert yn in ("yes", "no")
    assert isinstance(why, str)
    assert r.state.text.startswith(f"Is the sky blue? {yn} Because ")


def test_fork_children_inherit_text_and_captures(engine):
    @dp.program
    def prog(s):
        s += "Start:"
        s.gen("root", max_tokens=3, ignore_eos=True)
        kids = s.fork(3, label="k")
        kids += " then"  # broadcast, SGLang's forks += ...
        kids.gen("leaf", max_tokens=2, ignore_eos=True)
        return kids

    r = prog.run(engine, seed=3)
    kids = r.value
    root = r.state
    assert len(kids) == 3
    for k in kids:
        assert k.parent is root and k.depth == 1 and k.node.label == "k"
        assert k["root"] == root["root"]
        assert k.text.startswith(root.text + " then")
        assert k.num_gen_tokens == 5
        assert "leaf" not in root.captures
    assert [c for c in r.tree[root.id].children] == [k.id for k in kids]
    assert len({k.seed for k in kids} | {root.seed}) == 4


def test_parent_continues_after_fork(engine):
    @dp.program
    def prog(s):
        s += "A"
        kids = s.fork(2)
        s += "B"
        s.gen("after", max_tokens=2, ignore_eos=True)
        for k in kids:
            k.gen("kid", max_tokens=2, ignore_eos=True)
        return [k.text for k in kids]

    r = prog.run(engine, seed=4)
    assert r.state.text.startswith("AB")
    assert all(t.startswith("A") and not t.startswith("AB") for t in r.value)


def test_sub_program_runs_inline(engine):
    @dp.program
    def answer(s, tokens: int = 2):
        s.gen("a", max_tokens=tokens, ignore_eos=True)
        return s["a"]

    @dp.program
    def outer(s):
        s += "Q:"
        return answer(s, tokens=3)

    r = outer.run(engine, seed=0)
    assert r.value == r["a"] and r.state.num_gen_tokens == 3


def test_release_and_errors(engine):
    @dp.program
    def prog(s):
        s += "x"
        s.gen("a", max_tokens=2, ignore_eos=True)
        s.release()
        s["note"] = "kept"  # plain values may still be set
        with pytest.raises(StateReleasedError):
            s.gen("b", max_tokens=2)
        with pytest.raises(StateReleasedError):
            s += "more"
        return s["a"], s["note"]

    r = prog.run(engine, seed=0)
    assert isinstance(r.value[0], str) and r.value[1] == "kept"
    assert r.tree[r.state.id].released


def test_gen_option_errors(engine):
    @dp.program
    def prog(s):
        s.gen("x", temprature=0.5)

    with pytest.raises(GenOptionError, match="did you mean 'temperature'"):
        prog.run(engine)
    with pytest.raises(TypeError, match="missing required argument"):
        dp.program(lambda s, q: None).run(engine)


def test_missing_capture_names_the_known_ones(engine):
    @dp.program
    def prog(s):
        s += "x"
        s.gen("a", max_tokens=1)
        return s["b"]

    with pytest.raises(KeyError, match=r"no capture 'b' \(captures: \['a'\]\)"):
        prog.run(engine)


def test_program_decorator_forms():
    @dp.program(name="named")
    def f(s, a: int, b: str = "x"):
        """doc"""

    assert f.name == "named" and f.__doc__ == "doc"
    assert [(p.name, p.required) for p in f.params] == [("a", True), ("b", False)]
    assert f.bind({"a": 1}) == {"a": 1, "b": "x"}
    import importlib
    import types

    import dendrite

    # the package is a plain module; its `program` is the decorator function,
    # even once the submodule of the same name has been imported
    importlib.import_module("dendrite.program.program")
    assert type(dendrite.program) is types.ModuleType and not callable(dendrite.program)
    from dendrite.program import program

    assert isinstance(program, types.FunctionType)
    assert isinstance(program(lambda s: None), dp.Program)


def test_a_branch_goes_on_after_eos(engine):
    @dp.program
    def prog(s):
        s += "Once"
        kids = s.fork(32)
        kids.gen("a", max_tokens=48, temperature=1.0)
        ended = [k for k in kids if k.finish_reason == "eos"]
        for k in ended:
            k.gen("b", max_tokens=2, ignore_eos=True)  # continue the same branch
            k.fork(2).gen("c", max_tokens=2, ignore_eos=True)  # and fork it
        return ended

    ended = prog.run(engine, seed=0).value
    assert ended, "some of 32 random branches should end with EOS"
    for k in ended:
        assert isinstance(k["b"], str) and len(k.node.children) == 2
        assert "<|eos|>" in k.text  # the model saw the EOS before the continuation

"""SGLang idioms in the Python DSL: chat roles, unnamed gen, expression
concatenation, fork broadcasting and join, run-level sampling defaults,
gen_int/gen_string, var_scope. Each runs on the tiny real model."""

from __future__ import annotations

import re

import pytest

import dendrite.program as dp
from dendrite.program import (
    assistant,
    gen,
    gen_int,
    gen_string,
    program,
    select,
    system,
    user,
)


def _chat(engine, messages, gen_prompt=False):
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt)


# ---------------------------------------------------------------- chat roles


def test_multi_turn_chat_renders_through_the_template(engine):
    @program
    def mt(s):
        s.user("What is 2+2?")
        s.assistant(gen("a1", max_tokens=6))
        s.user("And 3+3?")
        s.assistant(gen("a2", max_tokens=6))
        return s

    st = mt.run(engine, seed=1).value
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": st["a1"]},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": st["a2"]},
    ]
    assert st.text == _chat(engine, messages)
    assert st.text.count("<|user|>") == 2 and st.text.count("<|assistant|>") == 2


def test_open_assistant_turn_is_the_generation_prompt(engine):
    """Before the assistant's gen, the text is exactly the template with the generation
    prompt, tokenized as one prompt (one BOS, not the template's plus the tokenizer's)."""
    seen = {}

    @program
    def p(s):
        with s.user():
            s += "Hi"
        with s.assistant():
            s.then(lambda st: seen.update(text=st._text, ids=list(st._seq.tokens)))
            s += gen("a", max_tokens=4)

    p.run(engine, seed=0)
    want = _chat(engine, [{"role": "user", "content": "Hi"}], gen_prompt=True)
    assert seen["text"] == want
    assert seen["ids"] == engine.tokenizer.encode(want, add_special_tokens=False)


def test_chat_prompt_has_one_bos_when_the_tokenizer_adds_one(make_engine, tiny_model_dir, tmp_path):
    """A tokenizer whose post-processor always prepends BOS (Llama 3's) plus a template
    that renders ``{{ bos_token }}`` would give two BOS; the chat prompt is encoded
    without the tokenizer's own, as ``generate --chat`` does."""
    import shutil

    from tokenizers import Tokenizer, processors

    d = tmp_path / "bos-model"
    shutil.copytree(tiny_model_dir, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    bos = "<|bos|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(d / "tokenizer.json"))
    from dendrite.engine import Engine

    eng = Engine(d, device="cpu", num_pages=256)
    try:
        assert eng.tokenizer.encode("x")[0] == eng.tokenizer.bos_token_id  # the setup holds
        seen = {}

        @program
        def p(s):
            s.user("Hi")
            s.then(lambda st: seen.update(ids=list(st._seq.tokens)))

        p.run(eng)
        assert seen["ids"].count(eng.tokenizer.bos_token_id) == 1
        assert eng.tokenizer.decode(seen["ids"], skip_special_tokens=False) == \
            _chat(eng, [{"role": "user", "content": "Hi"}])
    finally:
        eng.close()


def test_assistant_turn_ended_by_its_grammar_gets_the_template_end(engine):
    """A constrained answer ends with the grammar (no EOS generated): the template's
    end of turn (an EOS token here) is appended as a token, once, before the next turn."""
    seen = {}

    @program
    def p(s):
        s.user("Say yes.")
        s.assistant(gen("a", regex="yes"))
        s.user("Again.")
        s.then(lambda st: seen.update(ids=list(st._seq.tokens)))
        return s

    st = p.run(engine).value
    msgs = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Again."}]
    assert st["a"] == "yes" and st.text == _chat(engine, msgs)
    tok = engine.tokenizer
    assert seen["ids"].count(tok.eos_token_ids[0]) == 1 and seen["ids"].count(tok.bos_token_id) == 1


def test_sglang_style_role_expressions_and_shared_prefix(engine):
    """``s += user(...)`` works like ``s.user(...)``; forks after a turn share its KV
    and each continues the conversation on its own."""

    @program
    def p(s):
        s += user("Name a fruit.")
        s += assistant(gen("fruit", max_tokens=4))
        kids = s.fork(2)
        for i, k in enumerate(kids):
            k += user(f"Why {i}?")
            k += assistant(gen("why", max_tokens=4))
        return s, kids

    s, kids = p.run(engine, seed=2).value
    base = [{"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": s["fruit"]}]
    assert s.text == _chat(engine, base)
    for i, k in enumerate(kids):
        msgs = base + [{"role": "user", "content": f"Why {i}?"},
                       {"role": "assistant", "content": k["why"]}]
        assert k.text == _chat(engine, msgs)


def test_system_turn_and_chat_after_raw_text(engine):
    """``s.system`` renders as the template says; a chat begun after raw text
    appends the template without its BOS (a BOS belongs at the start only)."""

    @program
    def p(s):
        s += system("Be brief.")
        s.user("Hi")
        t = s.fork(1)[0]
        return s, t

    s, _ = p.run(engine).value
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert s.text == _chat(engine, msgs)

    @program
    def q(s):
        s += "Preamble."
        s.user("Hi")
        return s

    bos = engine.tokenizer.bos_token
    assert q.run(engine).value.text == "Preamble." + _chat(engine, msgs[1:])[len(bos):]


def test_text_outside_a_role_between_turns_is_a_clear_error(engine):
    @program
    def p(s):
        s.user("Hi")
        s += "stray"
        s.user("again")

    with pytest.raises(ValueError, match="not incremental at the start of a user turn"):
        p.run(engine)


def test_nested_roles_are_an_error(engine):
    @program
    def p(s):
        with s.user():
            s.user("inner")

    with pytest.raises(ValueError, match="user turn began inside the open user turn"):
        p.run(engine)


# ---------------------------------------------------------------- gen, select, +, forks


def test_unnamed_gen_appends_without_capture(engine):
    @program
    def p(s):
        s += "Hello" + gen(max_tokens=3, ignore_eos=True) + "!"
        s.gen(max_tokens=2, ignore_eos=True)
        return s

    st = p.run(engine, seed=0).value
    assert st.captures == {}
    assert st.text.startswith("Hello") and "!" in st.text
    assert st.num_gen_tokens == 5


def test_expression_concatenation(engine):
    @program
    def p(s):
        s += "Q: " + gen("a", max_tokens=3, ignore_eos=True) + "\nA:" + gen("b", max_tokens=2)
        return s

    st = p.run(engine, seed=0).value
    assert st.text.startswith("Q: " + st["a"] + "\nA:" + st["b"])
    e = "x" + gen("a") + "y"
    assert isinstance(e, dp.Expr) and len(e) == 3 and e[0] == "x" and e[2] == "y"


def test_select_with_positional_choices(engine):
    @program
    def p(s):
        s += "Pick:"
        s += select("x", [" a", " b"])
        return s

    st = p.run(engine).value
    assert st["x"] in (" a", " b") and st.meta_info("x")["choices"] == [" a", " b"]


def test_forks_broadcast_text_and_lambda_then_join(engine):
    """SGLang's expert-answer shape: fork, ``forks += lambda i: ...``, join."""

    @program
    def p(s):
        s += "Tips:"
        forks = s.fork(3)
        forks += "\n"
        forks += lambda i: f"Tip {i}:" + gen("tip", max_tokens=3, ignore_eos=True)
        forks.join()
        return s, forks

    s, forks = p.run(engine, seed=0).value
    for i, k in enumerate(forks):
        assert k.text.startswith(f"Tips:\nTip {i}:")
    assert s["tip"] == [k["tip"] for k in forks]


def test_join_other_mode_says_what_to_use(engine):
    @program
    def p(s):
        s.fork(2).join(mode="concate_and_append")

    with pytest.raises(ValueError, match="only 'gather_variable'.*join"):
        p.run(engine)


# ---------------------------------------------------------------- run-level sampling defaults


def test_run_level_sampling_defaults_apply_to_every_gen(make_engine):
    @program
    def p(s):
        s += "A"
        s.gen("x", ignore_eos=True)
        s.gen("y", max_tokens=2, ignore_eos=True)  # its own option wins
        return s

    st = p.run(make_engine(), temperature=0, max_tokens=5).value
    assert st.num_gen_tokens == 7
    # Greedy: a second run with another seed draws the same text.
    again = p.run(make_engine(), seed=123, sampling={"temperature": 0, "max_tokens": 5}).value
    assert again.text == st.text


def test_program_params_win_and_bad_defaults_are_named(engine):
    @program
    def p(s, max_tokens: int = 1):
        s += "A"
        s.gen("x", max_tokens=max_tokens, ignore_eos=True)
        return s

    assert p.run(engine, max_tokens=3).value.num_gen_tokens == 3
    with pytest.raises(TypeError, match="temprature.*did you mean 'temperature'"):
        p.run(engine, sampling={"temprature": 0})
    with pytest.raises(TypeError, match="temperature"):
        p.run(engine, temperature="hot")
    with pytest.raises(TypeError, match="unexpected argument.*colour"):
        p.run(engine, colour=1)


def test_default_max_tokens_is_128_for_program_gens():
    from dendrite.program.options import DEFAULT_MAX_TOKENS, make_spec
    from dendrite.sampling import SamplingParams

    assert make_spec("x", {}).sampling["max_tokens"] == DEFAULT_MAX_TOKENS == 128
    assert SamplingParams().max_tokens == 16


# ---------------------------------------------------------------- gen_int, gen_string, var_scope


@pytest.mark.parametrize("seed", [0, 3])
def test_gen_int_and_gen_string_match_sglang_regexes(engine, seed):
    @program
    def p(s):
        s += "n = " + gen_int("n", max_tokens=12) + "\nname = " + gen_string("s", max_tokens=12)
        return s

    st = p.run(engine, seed=seed).value
    segs = {g.name: g for g in st.node.segments if g.kind == "gen"}
    for name, full, prefix in (("n", dp.state.REGEX_INT, r"[-+]?[0-9]*[ \n]*"),
                               ("s", dp.state.REGEX_STRING, r'"[\w\d\s]*"?')):
        cut = segs[name].finish_reason == "length"
        # Complete unless cut by max_tokens; then still a prefix of the language.
        assert re.fullmatch(prefix if cut else full, st[name]), (name, st[name], cut)
    assert st["n"][:1] in "+-0123456789" and st["n"] and st["s"].startswith('"')


def test_regex_shortcut_fullmatch(engine):
    @program
    def p(s):
        s += "Year:" + gen("y", regex=r" (19|20)[0-9]{2}")
        return s

    assert re.fullmatch(r" (19|20)[0-9]{2}", p.run(engine, seed=0).value["y"])


def test_var_scope_captures_all_text_appended_inside(engine):
    @program
    def p(s):
        s += "Start. "
        with s.var_scope("answer"):
            s += "The answer is"
            s += gen("g", max_tokens=3, ignore_eos=True)
            s += "."
        s += " End."
        return s

    st = p.run(engine, seed=0).value
    assert st["answer"] == "The answer is" + st["g"] + "."
    assert st.text == "Start. " + st["answer"] + " End."


# ---------------------------------------------------------------- docs


def test_programs_md_coming_from_sglang_example_runs(make_engine):
    """The "Coming from SGLang" example of docs/programs.md, run as written."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "programs.md").read_text()
    section = doc.split("## Coming from SGLang", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    engine = make_engine()
    ns = {"engine": engine}
    exec(compile(code, "programs.md", "exec"), ns)  # noqa: S102 - the doc example, as written
    answer, confidence, tips = ns["result"].value
    st = ns["result"].state
    assert isinstance(answer, str) and re.fullmatch(r"[-+]?[0-9]*[ \n]*", confidence)
    assert isinstance(tips, list) and len(tips) == 2 and all(isinstance(t, str) for t in tips)
    assert st["reply"] == "Confidence: " + confidence
    messages = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "How sure are you, 0-9?"},
        {"role": "assistant", "content": st["reply"]},
    ]
    assert st.text == _chat(engine, messages)
    assert "Images / parallel_encoding KV concatenation: not in scope" in section


def test_script_programs_take_run_level_sampling_defaults(make_engine, dsl):
    """A `.dendrite` script compiles to the same Program: ``run(temperature=0,
    max_tokens=4)`` applies to its gens (greedy: seeds do not matter)."""
    prog = dsl.loads('program p():\n    "A"\n    gen x(ignore_eos=true)\n    return x\n', "p.dendrite")
    a = prog.run(make_engine(), seed=1, temperature=0, max_tokens=4)
    b = prog.run(make_engine(), seed=2, temperature=0, max_tokens=4)
    assert a.value == b.value and a.state.num_gen_tokens == 4


def _with_template(make_engine, template):
    eng = make_engine()
    eng.tokenizer.chat_template = template
    return eng


def test_a_template_that_rewrites_earlier_turns_is_a_clear_error(make_engine):
    """Rendering only the last message: turn 2's rendering does not continue turn 1's
    text, which is already in the KV; the run fails naming the turn."""
    eng = _with_template(make_engine, "{% for m in messages[-1:] %}[{{ m['role'] }}]{{ m['content'] }}"
                                      "{% endfor %}")

    @program
    def p(s):
        s.user("one")
        s.user("two")

    with pytest.raises(ValueError, match="not incremental at the start of a user turn"):
        p.run(eng)


def test_a_template_that_drops_a_role_is_a_clear_error(make_engine):
    eng = _with_template(make_engine, "{% for m in messages %}{% if m['role'] != 'system' %}"
                                      "[{{ m['role'] }}]{{ m['content'] }}{% endif %}{% endfor %}")

    @program
    def p(s):
        s.system("Be brief.")

    with pytest.raises(ValueError, match="drops system messages"):
        p.run(eng)

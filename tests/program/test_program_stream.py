"""Stop strings in programs (SGLang's semantics: ``gen(stop=".") + "."`` shows
"." once; ``include_stop`` keeps it) and streaming a gen's text with
``run(on_text=...)``, on the tiny model with greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

import dendrite.program as dp

PROMPT = "Q: "
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@dp.program
def free(s):
    s += PROMPT + dp.gen("a", **GREEDY)
    return s["a"]


def ascii_stop(text: str) -> str:
    """Two ASCII printable characters from the middle of `text`, first seen there."""
    for i in range(2, len(text) - 4):
        stop = text[i:i + 2]
        if stop.isascii() and stop.isprintable() and text.find(stop) == i:
            return stop
    pytest.skip("no ASCII pair in the tiny model's greedy text")


@pytest.fixture(scope="module")
def full(engine) -> str:
    return free.run(engine).value


def test_gen_stop_then_the_stop_text_shows_it_once(engine, full):
    stop = ascii_stop(full)

    @dp.program
    def p(s):
        s += PROMPT + dp.gen("a", stop=stop, **GREEDY) + stop + "!"

    st = p.run(engine).state
    head = full[:full.find(stop)]
    assert st["a"] == head
    assert st.text == PROMPT + head + stop + "!"  # once: the gen's copy was cut
    meta = st.meta_info("a")
    assert meta["finish_reason"] == "stop" and meta["matched_stop"] == stop


def test_include_stop_keeps_it(engine, full):
    stop = ascii_stop(full)

    @dp.program
    def p(s):
        s += PROMPT + dp.gen("a", stop=stop, include_stop=True, **GREEDY) + "!"

    st = p.run(engine).state
    head = full[:full.find(stop) + len(stop)]
    assert st["a"] == head and st.text == PROMPT + head + "!"
    assert st.meta_info("a")["matched_stop"] == stop


def test_meta_info_without_a_stop(engine):
    st = free.run(engine).state
    assert st.meta_info("a") == {"finish_reason": "length", "matched_stop": None,
                                 "completion_tokens": 24}


def test_dsl_gen_include_stop(engine, dsl, full):
    stop = ascii_stop(full)
    src = (
        "program p(stop):\n"
        f'    "{PROMPT}"\n'
        "    gen a(max_tokens=24, temperature=0, ignore_eos=true, stop=stop, include_stop=true)\n"
        "    return a\n"
    )
    out = dsl.loads(src, "t.dendrite").run(engine, stop=stop).value
    assert out == full[:full.find(stop) + len(stop)]


def test_dsl_include_stop_must_be_a_bool(dsl):
    src = "program p():\n    gen a(include_stop=1)\n"
    with pytest.raises(Exception, match="include_stop must be true or false"):
        dsl.loads(src, "t.dendrite")


def test_gen_include_stop_must_be_a_bool():
    with pytest.raises(TypeError, match="include_stop must be true or false"):
        dp.gen("a", include_stop="yes")


# ---------------------------------------------------------------- streaming


def test_on_text_streams_deltas_that_join_to_each_capture(engine, full):
    stop = ascii_stop(full)
    got: dict[tuple[str, str], list[str]] = {}
    early = []  # deltas that came while their gen was still running

    @dp.program
    def p(s):
        s += PROMPT
        kids = s.fork(2)
        kids[0] += dp.gen("a", **GREEDY)
        kids[1] += dp.gen("a", stop=stop, **GREEDY)
        return [k["a"] for k in kids]

    def on_text(state, name, delta):
        got.setdefault((state.node.path, name), []).append(delta)
        early.append(name not in state._captures)

    r = p.run(engine, on_text=on_text)
    (_, d0), (_, d1) = sorted(got.items())
    assert "".join(d0) == r.value[0] == full
    assert "".join(d1) == r.value[1] == full[:full.find(stop)]
    assert stop not in "".join(d1)
    assert len(d0) > 3 and sum(early) > 3  # streamed as produced, not at the end
    for d in d0 + d1:
        assert d  # no empty deltas


def test_on_text_error_stops_the_run(engine):
    class Enough(Exception):
        pass

    def on_text(state, name, delta):
        raise Enough("seen enough")

    with pytest.raises(Enough, match="seen enough"):
        free.run(engine, on_text=on_text)
    # The engine is left clean: a later run works.
    assert free.run(engine).value


DOC = Path(__file__).resolve().parents[2] / "docs" / "programs.md"


def test_programs_md_stop_and_stream_example_runs(engine, capsys):
    """The example of docs/programs.md's "Stop strings and streaming", as written."""
    import dendrite

    section = DOC.read_text().split("## Stop strings and streaming", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {"dendrite": dendrite, "engine": engine}
    exec(compile(code, "programs.md", "exec"), ns)
    st = ns["result"].state
    assert capsys.readouterr().out == st["why"]  # the deltas of "why", streamed
    assert st.meta_info("word")["matched_stop"] == " " == ns["result"].value  # this seed's
    assert " " not in st["word"]
    # One space before "(one word)": the gen's stop space was cut from the text.
    head = st.text.split(" (one word)\n")[0]
    assert head == "Q: Name a colour. A: " + st["word"]

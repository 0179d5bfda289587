"""Each port in examples/sglang_ports/ runs on the default engine (``dendrite.Engine()``,
here the tiny random-weight model through DENDRITE_MODEL) and returns what it should:
what the model may say is random, so the checks are on what the program guarantees
(regex match, choice in the set, JSON valid under the schema, fork counts, streamed
deltas joining to the capture)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

PORTS = Path(__file__).resolve().parents[2] / "examples" / "sglang_ports"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"sglang_port_{name}", PORTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def default_engine(tiny_model_dir):
    import dendrite

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENDRITE_MODEL", str(tiny_model_dir))
        eng = dendrite.Engine()
    yield eng
    eng.close()


def test_readme_lists_every_port():
    readme = (PORTS / "README.md").read_text()
    files = sorted(p.name for p in PORTS.glob("*.py"))
    assert len(files) == 10
    for f in files:
        assert f in readme, f"README.md does not list {f}"


def test_few_shot_qa_answers_one_line(default_engine):
    answer = load("few_shot_qa").main(default_engine)
    assert isinstance(answer, str) and "\n" not in answer


def test_mt_bench_has_two_assistant_turns_through_the_template(default_engine):
    st = load("mt_bench").main(default_engine)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": st["answer_1"]},
        {"role": "user", "content": "Now make it rhyme."},
        {"role": "assistant", "content": st["answer_2"]},
    ]
    want = default_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert st.text == want
    assert st.meta_info("answer_1")["completion_tokens"] <= 16


def test_select_answer_is_one_of_the_choices_ranked_best(default_engine):
    mod = load("select_choice")
    answer = mod.main(default_engine)
    assert answer in mod.CHOICES
    # run again to read the scores: the winner is the best-scored choice
    st = mod.decide.run(default_engine, statement="The capital of France is Paris.", seed=0).state
    info = st.meta_info("answer")
    assert info["choices"][info["index"]] == answer
    assert info["scores"][info["index"]] == max(info["scores"])


def test_regex_ip_fullmatches(default_engine):
    mod = load("regex_ip")
    ip = mod.main(default_engine)
    assert re.fullmatch(mod.IP_REGEX, ip)
    assert all(0 <= int(part) <= 255 for part in ip.split("."))


def test_json_decode_is_valid_json_under_the_schema(default_engine):
    mod = load("json_decode")
    obj = json.loads(mod.main(default_engine))
    assert set(obj) == set(mod.SCHEMA["required"])
    assert re.fullmatch(mod.SCHEMA["properties"]["name"]["pattern"].strip("^$"), obj["name"])
    assert obj["country"] in mod.SCHEMA["properties"]["country"]["enum"]


def test_expert_answer_picks_an_expert_and_joins_two_forks(default_engine):
    mod = load("expert_answer")
    st = mod.main(default_engine)
    assert st["expert"] in mod.EXPERTS
    answers = st["answer"]
    assert isinstance(answers, list) and len(answers) == 2
    assert all(isinstance(a, str) and "\n" not in a for a in answers)


def test_tool_use_chooses_a_known_tool(default_engine):
    mod = load("tool_use")
    st = mod.main(default_engine)
    assert st["tool"] in mod.TOOLS
    assert f"I need to use a {st['tool']}. The input to the tool is: {st['tool_input']}" in st.text


def test_react_steps_choose_known_actions(default_engine):
    mod = load("react")
    st = mod.main(default_engine)
    for i in (1, 2):
        assert st[f"action_{i}"] in mod.ACTIONS
        assert "]" not in st[f"argument_{i}"]
        assert f"Action {i}: {st[f'action_{i}']}[{st[f'argument_{i}']}]\n" in st.text


def test_parallel_decoding_joins_every_tip_then_summarizes(default_engine):
    mod = load("parallel_decoding")
    st = mod.main(default_engine)
    tips = st["tip"]
    assert isinstance(tips, list) and len(tips) == mod.NUM_TIPS
    for i, tip in enumerate(tips):
        assert f"Tip {i + 1}:{tip}\n" in st.text
    assert st.text.endswith("In summary," + st["summary"])  # the stop "\n" is cut


def test_stream_deltas_join_to_the_capture(default_engine):
    value, deltas = load("stream").main(default_engine)
    assert len(deltas) > 1  # it did stream, not deliver the capture in one piece
    assert "".join(deltas) == value

"""bench_tot_gsm8k.py: SGLang's answer rule, the workloads, chat turns, the three
systems computing the same tree, and a --quick run of the whole script."""

from __future__ import annotations

import json

import pytest

import bench_common as bc
import bench_tot_gsm8k as T
from conftest import run_script


def test_answer_rule_is_sglangs():
    assert T.answer_value("48 / 2 = 24 clips. 48 + 24 = 72 clips, or 1,072.") == 1072
    assert T.answer_value("The answer is $18.50") == 50  # last run of digits, as SGLang
    assert T.answer_value("no number here") == T.INVALID
    assert T.majority([3, 5, 5, 3]) == 3  # tie: the value seen first
    assert T.majority([T.INVALID, T.INVALID, 7]) == T.INVALID  # invalid answers vote too
    assert T.majority([]) is None


def test_labels_are_the_integer_after_hashes():
    questions, labels = T.load_questions(T.DATA, 200)
    assert len(questions) == len(labels) == 200
    assert labels[0] == 18 and questions[0].startswith("Janet")
    with pytest.raises(ValueError, match="without '####'"):
        T.gsm8k_label("no marker 12")


def test_workloads_match_sglang():
    v0, deep = T.WORKLOADS["v0"], T.WORKLOADS["deep"]
    assert (v0.width, v0.depth, v0.gen_calls, v0.temperature) == (3, 3, 3 + 9 + 27, 0.3)
    assert (deep.width, deep.depth, deep.gen_calls, deep.temperature) == (2, 4, 2 + 4 + 8 + 16, 0.001)
    assert v0.vote_capture == "answer" and deep.vote_capture is None
    assert v0.user_turns("Q?")[0].endswith("Question: Q?")


def test_chat_turns_rebuild_the_templated_conversation(tiny_model):
    from dendrite.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model)
    chat = bc.ChatTurns.from_tokenizer(tok)
    assert chat.templated
    msgs = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}]
    assert chat.first("u1") + "a1" + chat.end + chat.turn("u2") == tok.apply_chat_template(msgs)


def test_chat_turns_refuse_a_template_that_rewrites_history():
    class Tok:  # keeps only the turns from the last user message on, as some templates do
        chat_template = "drops history"

        def apply_chat_template(self, messages, add_generation_prompt=True):
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            text = "".join(f"<u>{m['content']}</u>" if m["role"] == "user" else
                           f"<a>{m['content']}</a>" for m in messages[last:])
            return text + ("<a>" if add_generation_prompt else "")

    with pytest.raises(bc.ChatTemplateUnusable, match="rewrites earlier turns"):
        bc.ChatTurns.from_tokenizer(Tok())


def test_chat_turns_without_a_template_are_plain_text():
    class Tok:
        chat_template = None

    chat = bc.ChatTurns.from_tokenizer(Tok())
    assert not chat.templated
    assert chat.first("q") + "a" + chat.end + chat.turn("r") == "User: q\nAssistant:a\nUser: r\nAssistant:"


def test_greedy_trees_agree_across_dendrite_hf_naive_hf_strong(tiny_model, one_thread):
    """Same tokens in, same tokens out: the HF baselines compute the very tree
    Dendrite does (strong: left-padded batch of two questions, repeated cache)."""
    pytest.importorskip("transformers")
    import torch

    from dendrite.engine import Engine

    engine = Engine(tiny_model, device="cpu")
    try:
        chat = bc.ChatTurns.from_tokenizer(engine.tokenizer)
        qs, _ = T.load_questions(T.DATA, 2)  # different lengths: padding is exercised
        wl = T.Workload("g", "greedy", 2, 0.0, ("Plan: ", "Do it.", "Final?"),
                        ("plan", "answer", "final"), None)
        res = T.make_program().run_batch(
            engine, [dict(question=q, wl=wl, chat=chat, max_tokens=6) for q in qs], seed=0)
        dendrite_texts = [r.value for r in res]
        model = bc.load_hf(tiny_model, torch.device("cpu"), torch.float32)
        hf = T.HFToT(model, engine.tokenizer, chat, torch.device("cpu"))
        naive = [hf.votes(wl, hf.naive(wl, q, 6, 0)) for q in qs]
        strong = [hf.votes(wl, leaves) for leaves in hf.strong(wl, qs, 6, 0)]
    finally:
        engine.close()
    assert all(len(t) == 8 for t in dendrite_texts)  # 2 x 2 x 2 leaves, full texts
    assert dendrite_texts == naive == strong
    assert "Final?" in dendrite_texts[0][0] and qs[1] in dendrite_texts[1][0]


def test_quick_run_writes_table_and_json(quick_results):
    q = quick_results["tot"]
    d = q["json"]
    rows = d["rows"]
    seen = {(r["workload"], r["system"], r["in_flight"]) for r in rows}
    for w in ("v0", "deep"):
        assert {(w, "Dendrite", 1), (w, "Dendrite", 2), (w, "HF strong", 1),
                (w, "HF naive", 1)} <= seen
    for r in rows:
        assert not r.get("skipped"), r
        assert r["gen_calls"] == r["gen_calls_expected"] == T.WORKLOADS[r["workload"]].gen_calls * r["questions"]
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["preds"]) == r["questions"]
        assert r["wall_s"] > 0 and r["gen_tokens"] > 0
        assert abs(sum(r["chunk_s"]) - r["wall_s"]) <= 0.1 * r["wall_s"] + 0.05
        if r["system"].startswith("HF"):
            assert r["vs_dendrite"] > 0 and r["dendrite_row"].startswith("Dendrite")
    # a row at in-flight N runs max(N, --num-questions) questions
    assert next(r for r in rows if r["system"] == "Dendrite" and r["in_flight"] == 2)["questions"] == 2
    assert d["env"]["chat_template"] is True and d["env"]["device"] == "cpu"
    header = "| workload | system | questions | in-flight |"
    assert header in q["stdout"] and header in q["md"]
    assert q["md"].count("\n| v0 |") == 4 and q["md"].count("\n| deep |") == 4


def test_budget_marks_rows_skipped_and_keeps_valid_json(tiny_model, bench_env, tmp_path):
    out = tmp_path / "tot.json"
    p = run_script("bench_tot_gsm8k.py", ["--model", str(tiny_model), "--device", "cpu", "--quick",
                                          "--budget", "0", "--out", str(out)], bench_env)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(r["skipped"] == "out of --budget" for r in rows)
    assert "skipped" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--in-flight", "0"], "--in-flight needs integers >= 1"),
    (["--in-flight", "1,x"], "--in-flight must be a comma list of integers"),
    (["--workloads", "v9"], "--workloads: unknown v9"),
    (["--hf", "fast"], "--hf: unknown fast"),
    (["--hf-naive-workloads", "v1"], "--hf-naive-workloads: unknown v1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse(["--out", "x.json", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_model_dir_without_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=f"--model {tmp_path}: no config.json there"):
        bc.resolve_model(str(tmp_path))


def test_default_model_falling_back_to_tiny_is_noted(tmp_path):
    from dendrite.default_model import TINY_NAME

    assert "not those of a real model" in bc.model_warning("default", tmp_path / TINY_NAME)
    assert bc.model_warning("default", tmp_path / "smollm2-135m-instruct-b179c9523d0e") is None
    assert bc.model_warning(str(tmp_path / TINY_NAME), tmp_path / TINY_NAME) is None  # asked for

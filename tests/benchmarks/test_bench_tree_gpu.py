"""bench_tree_gpu.py on the CPU with its tiny model: the ToT section runs the
library's `dendrite.search.tot_bfs` (what users run) beside the hand-written
engine loop and HF, on the same workload and prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_script

TOT_ONLY = "fork,decode,kv,mcts,grammar,cascade"
WIDTH, KEEP, DEPTH, TOKENS, PROMPT = 4, 4, 3, 8, 64  # the script's --tiny sizes


def bench(tmp_path: Path, env: dict[str, str], skip: str) -> tuple[dict, str, str, Path]:
    out, model = tmp_path / "out", tmp_path / "model"
    p = run_script("bench_tree_gpu.py", ["--tiny", "--device", "cpu", "--skip", skip,
                                         "--out", str(out), "--model-dir", str(model)],
                   env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "tree_bench.json").read_text())
    return res, (out / "tree_bench.md").read_text(), p.stdout, model


@pytest.fixture(scope="module")
def tot_run(tmp_path_factory, bench_env):
    pytest.importorskip("transformers")
    return bench(tmp_path_factory.mktemp("tree-bench"), bench_env, TOT_ONLY)


def test_tot_runs_tot_bfs_on_the_same_workload_as_the_hand_loop_and_hf(tot_run):
    res, _, _, _ = tot_run
    tot = res["sections"]["tot"]
    assert "error" not in tot and "skipped" not in tot, tot
    assert tot["api"] == "dendrite.search.tot_bfs"
    levels = [WIDTH, KEEP * WIDTH, KEEP * WIDTH]  # root's children, then keep x width per level
    lib, hand = tot["library"], tot["hand"]
    assert lib["levels"] == hand["levels"] == tot["hf_levels"] == levels == tot["levels"]
    tokens = sum(levels) * TOKENS  # EOS ignored: every node samples exactly TOKENS
    assert lib["tokens"] == hand["tokens"] == tot["hf_tokens"] == tokens == tot["dendrite_tokens"]
    assert lib["best_path_tokens"] == DEPTH * TOKENS  # the returned state is a deepest leaf
    assert lib["best_mean_logprob"] < 0 and hand["best_mean_logprob"] < 0
    assert tot["dendrite_s"] == lib["s"] > 0 and tot["hand_s"] == hand["s"] > 0
    assert tot["speedup"] == pytest.approx(tot["hf_s"] / tot["dendrite_s"])
    # every page is back in the pool after a run; the tree held some while it ran
    assert lib["pages_left"] == hand["pages_left"] == 0
    assert lib["peak_pages"] >= PROMPT // 16 + sum(levels[-1:])


def test_tot_prompt_is_text_of_the_recorded_token_count(tot_run):
    from dendrite.model.tokenizer import Tokenizer

    res, _, _, model = tot_run
    tot = res["sections"]["tot"]
    assert tot["prompt_tokens"] == PROMPT  # the "." padding reaches the asked length exactly
    assert len(Tokenizer(model).encode(tot["prompt_text"])) == tot["prompt_tokens"]
    assert f"a {PROMPT}-token prompt" in tot["definition"]


def test_tot_table_has_the_library_row_then_the_hand_loop(tot_run):
    _, md, stdout, _ = tot_run
    lines = md.splitlines()
    lib = next(i for i, x in enumerate(lines) if "`dendrite.search.tot_bfs`" in x)
    assert f"(36 nodes x {TOKENS} tok, {PROMPT}-tok prompt)" in lines[lib]
    assert lines[lib + 1].startswith("| same, hand-written loop (engine API) |")
    assert lines[lib] in stdout  # the table is printed at the end too


@pytest.mark.slow  # ~15 s: every section on the tiny model
def test_every_section_runs_on_cpu(tmp_path, bench_env):
    pytest.importorskip("transformers")
    res, md, _, _ = bench(tmp_path, bench_env, "")
    s = res["sections"]
    for name in ("build", "hf_load", "engine", "fork", "tot", "decode", "kv", "mcts", "grammar"):
        assert "error" not in s[name] and "skipped" not in s[name], (name, s[name])
    assert s["cascade"]["notes"] == ["skipped: needs CUDA + FlashInfer"]
    assert s["kv"]["met"] and s["mcts"]["forks"] == 60
    assert "error" not in md

"""Run-time failures of .dendrite scripts are located ScriptErrors, never tracebacks.

Scripts are driven the way ``dendrite run`` drives them (`dsl.load` of a file,
then ``Program.run`` with ``seed``/``max_steps``) on the tiny model, and once
per case as a ``dendrite run`` subprocess: exit 1 (2 for a compile-time error),
stderr a located ``file:line:col: message`` line, the source line and a caret,
and no "Traceback". After every failed run the engine holds nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dendrite.program as dp

CLI = [sys.executable, "-m", "dendrite.cli"]


def held(engine) -> tuple[int, int, int]:
    """Live sequences, pinned cache entries, pages used once the prefix cache
    (which keeps released prompts' full pages on purpose) is emptied."""
    engine.cache.clear()
    return engine.tree.num_live_nodes, engine.cache.num_pinned, engine.memory_stats()["pages_used"]


@pytest.fixture()
def clean(engine):
    """The engine holds no more sequences or pages after the test than before."""
    before = held(engine)
    yield
    assert held(engine) == before


def dendrite_run(dsl, engine, path: Path, *, args=None, **kw):
    """What `dendrite run` does: load the file, run its program; returns the
    ScriptError either step raised (any other exception fails the test)."""
    kw.setdefault("seed", 0)
    with pytest.raises(dsl.ScriptError) as ei:
        prog = dsl.load(path)
        prog.run(engine, **kw, **(args or {}))
    return ei.value


def write(tmp_path: Path, src: str, name: str = "t.dendrite") -> Path:
    p = tmp_path / name
    p.write_text(src)
    return p


def assert_at(e, cls, path: Path, line: int, col: int, *needles: str) -> None:
    assert type(e) is cls, (type(e), str(e))
    assert (e.filename, e.line, e.column) == (str(path), line, col), str(e)
    head = str(e).splitlines()[0]
    assert head.startswith(f"{path}:{line}:{col}: "), head
    for n in needles:
        assert n in e.message, (n, e.message)
    # the caret is under the reported column
    caret = str(e).splitlines()[2]
    assert caret.index("^") - 4 == col - 1, str(e)


@pytest.fixture(scope="module")
def cli_env(tiny_model_dir):
    return {**os.environ, "DENDRITE_MODEL": str(tiny_model_dir), "OMP_NUM_THREADS": "1",
            "PYTHONIOENCODING": "utf-8"}


def cli(path: Path, env, *extra: str, rc: int = 1) -> str:
    """``dendrite run PATH --quiet ...``: exit ``rc``, no traceback; returns stderr's
    first line, which must be the located error (then the source line and a caret)."""
    out = subprocess.run([*CLI, "run", str(path), "--quiet", *extra], env=env,
                         capture_output=True, encoding="utf-8", timeout=240)
    assert out.returncode == rc, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("dendrite: ")]
    assert len(lines) == 3 and lines[2].strip() == "^", out.stderr
    assert lines[0].startswith(f"{path}:"), out.stderr
    return lines[0]


# ------------------------------------------------------------ 1. gen before any prompt

GEN_FIRST = "program p():\n    gen x(max_tokens=2)\n    return {ret}\n"


@pytest.mark.parametrize("ret", ["x", "1"])
def test_gen_before_any_prompt_is_located_at_the_gen(dsl, engine, clean, tmp_path, ret):
    # `return x` waits for the gen (it was blamed on the return line);
    # `return 1` does not, and the failure came out of the final drain unlocated.
    path = write(tmp_path, GEN_FIRST.format(ret=ret))
    e = dendrite_run(dsl, engine, path)
    assert_at(e, dsl.ScriptRuntimeError, path, 2, 5, "gen 'x'", "empty sequence")


def test_gen_before_any_prompt_cli(cli_env, tmp_path):
    path = write(tmp_path, GEN_FIRST.format(ret="x"))
    assert "gen 'x'" in cli(path, cli_env).split(":2:5: ", 1)[1]


# ------------------------------------------------------------ 2. bad search-block options

SEARCH = 'program p(v=1):\n    "Q"\n    search {algo}({opts}) as g:\n        gen x(max_tokens=2)\n    return text\n'


@pytest.mark.parametrize("algo, opts, col, needle", [
    ("mcts", "width=-1, iterations=1, depth=1", 17, "'width' must be an int in [1, 65536], got -1"),
    ("mcts", "width=0, iterations=1, depth=1", 17, "'width' must be an int in [1, 65536], got 0"),
    ("mcts", "width=2, iterations=1, depth=0", 40, "'depth' must be an int in [1, 100000], got 0"),
    ("mcts", "width=2, iterations=1, depth=-3", 40, "'depth'"),
    ("mcts", "iterations=-1", 17, "'iterations'"),
    ("mcts", 'width="two"', 17, "'width' must be an int in [1, 65536], got 'two'"),
    ("mcts", "width=2.5", 17, "'width' must be an int in [1, 65536], got 2.5"),
    ("mcts", 'policy="ucb"', 17, "'policy' must be one of 'uct', 'puct'"),
    ("mcts", "c=-1", 17, "'c' must be a finite number >= 0"),
    ("beam", "width=-1", 17, "'width'"),
    ("beam", "depth=0", 17, "'depth'"),
    ("best_of", "n=0", 20, "'n' must be an int"),
    ("bfs", "keep=-1", 16, "'keep'"),
    ("dfs", "max_expansions=0", 16, "'max_expansions'"),
])
def test_bad_constant_search_option_is_located_at_the_option(dsl, engine, clean, tmp_path,
                                                              algo, opts, col, needle):
    path = write(tmp_path, SEARCH.format(algo=algo, opts=opts))
    e = dendrite_run(dsl, engine, path)
    assert_at(e, dsl.ScriptSyntaxError, path, 3, col, "search option " + needle)


@pytest.mark.parametrize("value", [-1, 0, "a", 10 ** 20])
def test_bad_search_option_from_an_argument_is_located_at_the_option(dsl, engine, clean,
                                                                      tmp_path, value):
    path = write(tmp_path, SEARCH.format(algo="mcts", opts="width=v, iterations=1, depth=1"))
    e = dendrite_run(dsl, engine, path, args={"v": value})
    assert_at(e, dsl.ScriptRuntimeError, path, 3, 17, "search option 'width' must be an int")


def test_bad_search_option_cli(cli_env, tmp_path):
    path = write(tmp_path, SEARCH.format(algo="mcts", opts="width=-1"))
    first = cli(path, cli_env, rc=2)  # found when the script compiles, before the model loads
    assert first.startswith(f"{path}:3:17: search option 'width'")
    path = write(tmp_path, SEARCH.format(algo="mcts", opts="width=v, depth=1"), "arg.dendrite")
    first = cli(path, cli_env, "--arg", "v=-1")
    assert first.startswith(f"{path}:3:17: search option 'width'")


# ------------------------------------------------------------ 3. bad temperature

@pytest.mark.parametrize("src, cls, line, col, needle", [
    # constant: found when the script compiles, at the option
    ('program p():\n    "Q"\n    gen x(max_tokens=2, temperature=-1)\n    return x\n',
     "ScriptSyntaxError", 3, 25, "temperature must be finite and >= 0"),
    ('program p():\n    "Q"\n    gen x(max_tokens=2, temperature="hot")\n    return x\n',
     "ScriptSyntaxError", 3, 25, "temperature must be a number"),
    # computed: found when the gen is queued, at the option
    ('program p():\n    "Q"\n    gen x(max_tokens=2, temperature=float("nan"))\n    "more"\n    return 1\n',
     "ScriptRuntimeError", 3, 25, "NaN"),
    ('program p(t=-0.5):\n    "Q"\n    gen x(max_tokens=2, temperature=t)\n    return x\n',
     "ScriptRuntimeError", 3, 25, "temperature must be finite and >= 0"),
    # inside a search block's step
    ('program p():\n    "Q"\n    search mcts(width=2, iterations=1, depth=1) as g:\n'
     '        gen x(max_tokens=2, temperature=float("nan"))\n    return text\n',
     "ScriptRuntimeError", 4, 29, "NaN"),
    ('program p():\n    "Q"\n    search beam(width=2, depth=1) as g:\n'
     '        gen x(max_tokens=2, temperature=float("inf"))\n    return text\n',
     "ScriptRuntimeError", 4, 29, "temperature must be finite"),
    # a search's own temperature option
    ('program p():\n    "Q"\n    search mcts(prior_temperature=0) as g:\n        gen x(max_tokens=2)\n'
     '    return text\n', "ScriptSyntaxError", 3, 17, "'prior_temperature' must be a finite number > 0"),
    ('program p():\n    "Q"\n    search mcts(prior_temperature=float("nan")) as g:\n'
     '        gen x(max_tokens=2)\n    return text\n',
     "ScriptRuntimeError", 3, 17, "'prior_temperature' must be a finite number > 0, got nan"),
    ('program p():\n    "Q"\n    search mcts(prior_temperature="warm") as g:\n'
     '        gen x(max_tokens=2)\n    return text\n',
     "ScriptSyntaxError", 3, 17, "'prior_temperature'"),
])
def test_bad_temperature_is_located(dsl, engine, clean, tmp_path, src, cls, line, col, needle):
    path = write(tmp_path, src)
    e = dendrite_run(dsl, engine, path)
    assert_at(e, getattr(dsl, cls), path, line, col, needle)


def test_bad_temperature_cli(cli_env, tmp_path):
    path = write(tmp_path, 'program p():\n    "Q"\n    search mcts(width=2, iterations=1, depth=1) as g:\n'
                           '        gen x(max_tokens=2, temperature=float("nan"))\n    return text\n')
    assert cli(path, cli_env).startswith(f"{path}:4:29: temperature must be a number, got NaN")


# ------------------------------------------------------------ 4. lazy gens fail at the gen

@pytest.fixture(scope="module")
def nan_engine(tiny_model_dir, tmp_path_factory):
    """An engine whose logits are all NaN: every request fails inside a step."""
    import torch
    from safetensors.torch import load_file, save_file

    from dendrite.engine import Engine

    d = tmp_path_factory.mktemp("nan-model") / "llama"
    shutil.copytree(tiny_model_dir, d)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    e = Engine(d, device="cpu", num_pages=256)
    yield e, d
    e.close()


LAZY = ('program p():\n    "Q"\n    fork 2 as a:\n        gen x(max_tokens=3)\n'
        '    "then more text"\n    let n = 1\n    return {ret}\n')


@pytest.mark.parametrize("ret", ["x", "n"])
def test_failed_generation_is_pinned_on_its_gen(dsl, nan_engine, tmp_path, ret):
    engine, _ = nan_engine
    path = write(tmp_path, LAZY.format(ret=ret))
    e = dendrite_run(dsl, engine, path)
    assert_at(e, dsl.ScriptRuntimeError, path, 4, 9, "gen 'x'", "ModelOutputError", "NaN")
    assert held(engine) == (0, 0, 0)


def test_failed_generation_cli(cli_env, nan_engine, tmp_path):
    _, model = nan_engine
    path = write(tmp_path, LAZY.format(ret="x"))
    first = cli(path, cli_env, "--model", str(model))
    assert first.startswith(f"{path}:4:9: gen 'x': ModelOutputError")


def test_python_program_failure_names_the_gen(nan_engine):
    engine, _ = nan_engine

    @dp.program
    def p(s):
        s += "Q"
        s.gen("answer", max_tokens=2)
        return 1

    from dendrite.engine import ModelOutputError

    with pytest.raises(ModelOutputError) as ei:
        p.run(engine, seed=0)
    assert "(in gen 'answer' of state #0)" in getattr(ei.value, "__notes__", [])


# ------------------------------------------------------------ 5. fork limits

@pytest.mark.parametrize("count, needle", [
    ("10**20", "fork count 100000000000000000000 exceeds the limit of 65536 children per fork"),
    ("65537", "fork count 65537 exceeds the limit of 65536"),
])
def test_fork_count_limit_is_located_at_the_count(dsl, engine, clean, tmp_path, count, needle):
    path = write(tmp_path, f'program p():\n    "Q"\n    fork {count} as a:\n        gen x(max_tokens=2)\n'
                           '    return 1\n')
    e = dendrite_run(dsl, engine, path)
    assert_at(e, dsl.ScriptRuntimeError, path, 3, 10, needle)


def test_live_branch_limit_is_located_at_the_fork(dsl, engine, clean, tmp_path):
    # 2**k branches after k levels: the limit stops level 7 (128 > 100) before it forks
    path = write(tmp_path, 'program p():\n    "Q"\n    repeat 30:\n        fork 2 as a:\n            pass\n'
                           '    return 1\n')
    e = dendrite_run(dsl, engine, path, max_branches=100)
    assert_at(e, dsl.ScriptRuntimeError, path, 4, 14,
              "fork of 128 branches would make 128 live branches", "max_branches=100")


def test_search_width_over_the_fork_limit(dsl, engine, clean, tmp_path):
    path = write(tmp_path, SEARCH.format(algo="best_of", opts="n=70000"))
    e = dendrite_run(dsl, engine, path)
    assert_at(e, dsl.ScriptSyntaxError, path, 3, 20, "'n' must be an int in [1, 65536], got 70000")


def test_search_past_the_live_branch_limit_is_located_at_the_search(dsl, engine, clean, tmp_path):
    path = write(tmp_path, SEARCH.format(algo="best_of", opts="n=50"))
    e = dendrite_run(dsl, engine, path, max_branches=10)
    assert_at(e, dsl.ScriptRuntimeError, path, 3, 5, "search best_of", "max_branches=10")


def test_fork_limit_cli(cli_env, tmp_path):
    path = write(tmp_path, 'program p():\n    "Q"\n    fork 10**20 as a:\n        gen x(max_tokens=2)\n'
                           '    return 1\n')
    assert cli(path, cli_env).startswith(f"{path}:3:10: fork count 100000000000000000000 exceeds")


# ------------------------------------------------------------ 6. step budget

RUNAWAY = ('program p():\n    "Go"\n    while true max 100000:\n        fork 2 as a:\n'
           '            gen x(max_tokens=16, temperature=1.0, ignore_eos=true)\n'
           '        select a by logprob\n    return x\n')


def test_runaway_script_ends_at_the_step_budget(dsl, engine, clean, tmp_path):
    # each iteration waits (select), so the engine steps: the budget stops it
    path = write(tmp_path, RUNAWAY)
    e = dendrite_run(dsl, engine, path, max_steps=40)
    assert_at(e, dsl.ScriptRuntimeError, path, 5, 13, "gen 'x'", "budget of 40 engine steps")


def test_step_budget_cli(cli_env, tmp_path):
    path = write(tmp_path, RUNAWAY)
    first = cli(path, cli_env, "--max-steps", "5")
    assert first.startswith(f"{path}:5:13: gen 'x': the run used its budget of 5 engine steps")
    bad = subprocess.run([*CLI, "run", str(path), "--max-steps", "0"], env=cli_env,
                         capture_output=True, encoding="utf-8", timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.splitlines()[-1].startswith("dendrite run: error: argument --max-steps: "), bad.stderr


def test_chain_of_forks_that_never_waits_ends_at_the_depth_limit(dsl, engine, clean, tmp_path):
    # nothing waits, so no engine step runs: the fork depth bounds it instead
    path = write(tmp_path, 'program p():\n    "Go"\n    repeat 100000:\n        fork 1 as a:\n'
                           '            gen x(max_tokens=16)\n    return 1\n')
    e = dendrite_run(dsl, engine, path, max_steps=5)
    assert_at(e, dsl.ScriptRuntimeError, path, 4, 14, "10000 forks deep", "MAX_DEPTH=10000")

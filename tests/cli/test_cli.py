"""The `dendrite` command, driven as a subprocess: every subcommand and flag.

Exit status rule (see dendrite/cli.py): 0 ok; 2 a bad command line found
before any model loads (one line, or argparse's usage + one line); 1 a
failure while running (one clean message); 130 Ctrl-C; 70 an internal bug.
No error ever prints a traceback unless --traceback is given.

One tiny random-weight model (DENDRITE_MODEL) is shared by the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dendrite.tiny_model import build_tiny_model

CLI = [sys.executable, "-m", "dendrite.cli"]

# Every flag of every subcommand, as `--help` lists them. A flag added to the
# CLI without a test here makes test_help_lists_exactly_the_tested_flags fail.
FLAGS = {
    None: {"--help", "--traceback"},
    "generate": {"--help", "--traceback", "--model", "--max-tokens", "--temperature", "--top-p",
                 "--top-k", "--seed", "--device", "--chat", "--kv-dtype", "--quantization",
                 "--quantize-lm-head", "--tensor-parallel", "--speculative"},
    "run": {"--help", "--traceback", "--model", "--arg", "--program", "--seed", "--tree",
            "--device", "--json", "--max-nodes", "--max-steps", "--quiet", "--stream",
            "--kv-dtype", "--quantization", "--quantize-lm-head", "--tensor-parallel",
            "--speculative"},
    "demo": {"--help", "--traceback", "--context", "--forks", "--page-size", "--write"},
    "serve": {"--help", "--traceback", "--model", "--host", "--port", "--device", "--model-name",
              "--api-key", "--num-pages", "--max-request-bytes", "--max-tokens",
              "--max-prompt-tokens", "--max-handles-per-key", "--max-fork", "--handle-ttl",
              "--max-program-seconds", "--log-level"},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("cli_model") / "llama", "llama")


@pytest.fixture(scope="module")
def env(model) -> dict[str, str]:
    e = {**os.environ, "DENDRITE_MODEL": str(model), "OMP_NUM_THREADS": "1",
         "PYTHONIOENCODING": "utf-8"}
    return e


@pytest.fixture(scope="module")
def engine(model):
    from dendrite.engine import Engine

    e = Engine(model, device="cpu")
    yield e
    e.close()


def dendrite(*args: str, env: dict[str, str], cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True,
                          encoding="utf-8", errors="strict", timeout=timeout)


def assert_usage_error(out: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Exit 2 and one error line `prog: error: ...` naming the problem; before it at
    most argparse's usage line. Returns the error line."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.rstrip("\n").splitlines()
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), out.stderr
    if len(lines) > 1:  # argparse: one usage line, then the error
        assert len(lines) == 2 and lines[0].startswith(f"usage: {prog} "), out.stderr
    for n in needles:
        assert n in last, (n, last)
    return last


def assert_one_line(out: subprocess.CompletedProcess, rc: int, prog: str, *needles: str) -> str:
    """Exit `rc` and stderr is exactly one line `prog: error: ...`."""
    assert out.returncode == rc, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("[dendrite]")
             and not ln.startswith("dendrite: ")]  # the engine's own notes
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{prog}: error: "), out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -------------------------------------------------------------------- top level


@pytest.mark.parametrize("sub", [None, "generate", "run", "demo", "serve"])
def test_help_lists_exactly_the_tested_flags(sub, env):
    out = dendrite(*([sub] if sub else []), "--help", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: dendrite{' ' + sub if sub else ''}")
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out.stdout)) == FLAGS[sub]
    if sub is None:
        for name in ("generate", "run", "demo", "serve"):
            assert name in out.stdout


def test_short_help_and_console_script(env):
    exe = Path(sys.executable).with_name("dendrite")
    exe = str(exe) if exe.exists() else shutil.which("dendrite")
    assert exe, "the dendrite console script is not installed"
    out = subprocess.run([exe, "-h"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout and "demo" in out.stdout


def test_help_does_not_import_torch(env):
    code = (
        "import sys, contextlib, io\n"
        "from dendrite.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['run', '--help'], ['demo', '--help'],\n"
        "             ['serve', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0, argv\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_arguments_is_a_usage_error(env):
    assert_usage_error(dendrite(env=env), "dendrite", "required")


def test_unknown_subcommand_is_a_usage_error(env):
    assert_usage_error(dendrite("bogus", env=env), "dendrite", "'bogus'")


# --------------------------------------------------------------------- generate


def _expected(engine, prompt: str, chat: bool = False, **params) -> str:
    from dendrite.sampling import SamplingParams

    if chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    seq = engine.new_sequence(prompt, add_bos=not chat)
    [res] = engine.generate([seq], [SamplingParams(**params)])
    engine.release(seq)
    return res.text


def test_generate_streams_exactly_the_generated_text(env, model, engine):
    out = dendrite("generate", "Once upon a time", "--model", str(model), "--device", "cpu",
                   "--max-tokens", "24", "--temperature", "0.9", "--top-p", "0.95",
                   "--top-k", "40", "--seed", "7", env={**env, "DENDRITE_MODEL": "/nope"})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert f"model {model} on cpu" in out.stderr
    want = _expected(engine, "Once upon a time", temperature=0.9, top_p=0.95, top_k=40, seed=7,
                     max_tokens=24)
    assert want.strip()
    assert out.stdout == want + "\n"


def test_generate_default_flags_use_dendrite_model(env, engine):
    out = dendrite("generate", "Hello", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _expected(engine, "Hello", temperature=0.0, seed=0, max_tokens=64) + "\n"


def test_generate_chat_uses_the_chat_template(env, engine):
    out = dendrite("generate", "Hi there", "--chat", "--max-tokens", "8", env=env)
    assert out.returncode == 0, out.stderr
    want = _expected(engine, "Hi there", chat=True, temperature=0.0, seed=0, max_tokens=8)
    assert out.stdout == want + "\n"


def test_generate_chat_without_template_is_one_clean_error(env, model, tmp_path):
    d = tmp_path / "notemplate"
    shutil.copytree(model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = dendrite("generate", "Hi", "--chat", "--model", str(d), env=env)
    assert_one_line(out, 1, "dendrite generate", "chat template")
    assert out.stdout == ""


@pytest.mark.parametrize("argv, needles", [
    (["--max-tokens", "-1"], ["--max-tokens", "-1"]),
    (["--max-tokens", "many"], ["--max-tokens", "many"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "-0.5"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--top-k", "1.5"], ["--top-k"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(1 << 64)], ["--seed"]),
])
def test_generate_bad_numbers_are_usage_errors(env, argv, needles):
    assert_usage_error(dendrite("generate", "hi", *argv, env=env), "dendrite generate", *needles)


def test_generate_missing_prompt(env):
    assert_usage_error(dendrite("generate", env=env), "dendrite generate", "prompt")


def test_generate_empty_prompt(env):
    assert_one_line(dendrite("generate", "", env=env), 2, "dendrite generate", "prompt", "empty")


def test_generate_missing_model_dir(env, tmp_path):
    out = dendrite("generate", "hi", "--model", str(tmp_path / "nope"), env=env)
    assert_one_line(out, 2, "dendrite generate", "--model", str(tmp_path / "nope"), "does not exist")
    f = tmp_path / "file"
    f.write_text("x")
    out = dendrite("generate", "hi", "--model", str(f), env=env)
    assert_one_line(out, 2, "dendrite generate", "--model", "not a directory")


def test_generate_model_dir_that_fails_to_load(env, model, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(model, d)
    (d / "config.json").unlink()
    out = dendrite("generate", "hi", "--model", str(d), env=env)
    assert_one_line(out, 1, "dendrite generate", "config.json")


def test_generate_nan_weights_is_one_clean_error(env, model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(model, d)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = dendrite("generate", "hi", "--model", str(d), env=env)
    assert_one_line(out, 1, "dendrite generate", "NaN")


def test_generate_kv_dtype_fp8_streams_the_fp8_engines_text(env, model):
    from dendrite.engine import Engine
    from dendrite.model.kv_cache import KV_DTYPES
    from dendrite.sampling import SamplingParams

    from dendrite.cli_common import KV_DTYPE_CHOICES

    assert "fp8_e4m3" in KV_DTYPE_CHOICES and set(KV_DTYPE_CHOICES) <= set(KV_DTYPES)
    out = dendrite("generate", "Once upon a time", "--model", str(model), "--device", "cpu",
                   "--max-tokens", "12", "--kv-dtype", "fp8_e4m3", env=env)
    assert out.returncode == 0, out.stderr
    eng = Engine(str(model), device="cpu", kv_dtype="fp8_e4m3", num_pages=64)
    try:
        assert eng.memory_stats()["kv_dtype"] == "fp8_e4m3"
        [res] = eng.generate([eng.new_sequence("Once upon a time")],
                             [SamplingParams(temperature=0.0, max_tokens=12)])
    finally:
        eng.close()
    assert out.stdout == res.text + "\n"


def test_generate_kv_dtype_int4_streams_the_int4_engines_text(env, model):
    from dendrite.engine import Engine
    from dendrite.model.kv_cache import KV_DTYPES
    from dendrite.sampling import SamplingParams

    from dendrite.cli_common import KV_DTYPE_CHOICES

    assert {"int4", "int3"} <= set(KV_DTYPE_CHOICES) <= set(KV_DTYPES)
    out = dendrite("generate", "Once upon a time", "--model", str(model), "--device", "cpu",
                   "--max-tokens", "12", "--kv-dtype", "int4", env=env)
    assert out.returncode == 0, out.stderr
    eng = Engine(str(model), device="cpu", kv_dtype="int4", num_pages=64)
    try:
        assert eng.memory_stats()["kv_dtype"] == "int4"
        [res] = eng.generate([eng.new_sequence("Once upon a time")],
                             [SamplingParams(temperature=0.0, max_tokens=12)])
    finally:
        eng.close()
    assert out.stdout == res.text + "\n"


@pytest.mark.parametrize("quant", ["fp8", "mxfp8"])
def test_generate_quantization_streams_the_quantized_engines_text(env, model, quant):
    from dendrite.engine import Engine
    from dendrite.quant import weight_format
    from dendrite.quant.scheme import CHOICES
    from dendrite.sampling import SamplingParams

    from dendrite.cli_common import QUANTIZATION_CHOICES

    assert QUANTIZATION_CHOICES == CHOICES
    out = dendrite("generate", "Once upon a time", "--model", str(model), "--device", "cpu",
                   "--max-tokens", "12", "--quantization", quant, env=env)
    assert out.returncode == 0, out.stderr
    eng = Engine(str(model), device="cpu", quantization=quant, num_pages=64)
    try:
        assert weight_format(eng.runner.model) == quant
        [res] = eng.generate([eng.new_sequence("Once upon a time")],
                             [SamplingParams(temperature=0.0, max_tokens=12)])
    finally:
        eng.close()
    assert out.stdout == res.text + "\n"


@pytest.mark.parametrize("sub", ["generate", "run"])
def test_unknown_quantization_is_a_usage_error(env, sub):
    args = ["hi"] if sub == "generate" else ["tot"]
    out = dendrite(sub, *args, "--quantization", "int4", env=env)
    assert_usage_error(out, f"dendrite {sub}", "--quantization", "mxfp8")


@pytest.mark.parametrize("sub", ["generate", "run"])
def test_quantize_lm_head_without_a_format_is_a_usage_error(env, sub):
    args = ["hi"] if sub == "generate" else ["tot"]
    out = dendrite(sub, *args, "--quantize-lm-head", env=env)
    assert_usage_error(out, f"dendrite {sub}", "--quantize-lm-head", "--quantization fp8")


def test_generate_quantize_lm_head_streams_the_quantized_engines_text(env, model):
    from dendrite.engine import Engine
    from dendrite.quant import QuantLinear
    from dendrite.sampling import SamplingParams

    out = dendrite("generate", "Once upon a time", "--model", str(model), "--device", "cpu",
                   "--max-tokens", "12", "--quantization", "fp8", "--quantize-lm-head", env=env)
    assert out.returncode == 0, out.stderr
    eng = Engine(str(model), device="cpu", quantization="fp8", quantize_lm_head=True,
                 num_pages=64)
    try:
        assert isinstance(eng.runner.model.lm_head, QuantLinear)
        [res] = eng.generate([eng.new_sequence("Once upon a time")],
                             [SamplingParams(temperature=0.0, max_tokens=12)])
    finally:
        eng.close()
    assert out.stdout == res.text + "\n"


def test_generate_tensor_parallel_prints_the_tp1_text(env, model):
    """--tensor-parallel 2 on the CPU: two processes (gloo), the same greedy text."""
    args = ["Once upon a time", "--model", str(model), "--device", "cpu", "--max-tokens", "10",
            "--temperature", "0"]
    one = dendrite("generate", *args, env=env)
    two = dendrite("generate", *args, "--tensor-parallel", "2", env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


@pytest.mark.parametrize("sub", ["generate", "run"])
def test_bad_tensor_parallel_is_an_error(env, sub):
    args = ["hi"] if sub == "generate" else ["tot", "--arg", "question=2+2?"]
    out = dendrite(sub, *args, "--tensor-parallel", "0", env=env)
    assert_usage_error(out, f"dendrite {sub}", "--tensor-parallel")
    out = dendrite(sub, *args, "--device", "cpu", "--tensor-parallel", "3", env=env)
    assert out.returncode != 0 and "tensor_parallel 3 does not divide" in out.stderr


@pytest.mark.parametrize("sub", ["generate", "run"])
def test_unknown_kv_dtype_is_a_usage_error(env, sub):
    args = ["hi"] if sub == "generate" else ["tot"]
    out = dendrite(sub, *args, "--kv-dtype", "int2", env=env)
    assert_usage_error(out, f"dendrite {sub}", "--kv-dtype", "fp8_e4m3")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", ""])
def test_generate_unknown_device(env, device):
    assert_one_line(dendrite("generate", "hi", "--device", device, env=env), 2,
                    "dendrite generate", "--device")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_cuda_without_cuda(env):
    assert_one_line(dendrite("generate", "hi", "--device", "cuda", env=env), 2,
                    "dendrite generate", "--device", "CUDA")


# -------------------------------------------------------------------------- run


def test_run_standard_script_with_every_flag(env, model, tmp_path):
    html = tmp_path / "tot.html"
    out = dendrite("run", "tot", "--model", str(model), "--device", "cpu", "--program", "tot",
                   "--arg", "question=What is 2+3?", "--arg", "width=2", "--arg", "depth=1",
                   "--arg", "step_tokens=3", "--seed", "1", "--tree", str(html),
                   "--max-nodes", "2", "--max-steps", "1000", "--kv-dtype", "fp8_e4m3",
                   "--quantization", "fp8", env={**env, "DENDRITE_MODEL": "/nope"})
    assert out.returncode == 0, out.stderr
    assert re.search(r"^tree: \d+ nodes, depth 1", out.stdout, re.M)
    assert "engine steps" in out.stdout
    assert "[dendrite] done:" in out.stderr
    assert "What is 2+3?" in html.read_text()


def test_run_json_quiet(env, tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("What is 1+1?")
    out = dendrite("run", "self_consistency", "--quiet", "--json", "--arg", f"question=@{q}",
                   "--arg", "n=2", "--arg", "max_tokens=3", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["nodes"] == 3 and set(data) == {"result", "steps", "nodes", "gen_tokens"}
    assert "[dendrite]" not in out.stderr


SCRIPT = '''\
program p(q, flag=false, xs=[1, 2], n=1):
    "{q}"
    gen x(max_tokens=2)
    return x
'''


@pytest.fixture()
def script(tmp_path) -> Path:
    p = tmp_path / "p.dendrite"
    p.write_text(SCRIPT)
    return p


@pytest.mark.parametrize("args, needles", [
    (["--arg", "q"], ["--arg", "NAME=VALUE", "'q'"]),
    (["--arg", "q=a", "--arg", "nope=1"], ["no parameter 'nope'"]),
    (["--arg", "q=a", "--arg", "n=x"], ["--arg n", "'x'"]),
    (["--arg", "q=a", "--arg", "flag=maybe"], ["--arg flag", "'maybe'"]),
    (["--arg", "q=a", "--arg", "xs=[1"], ["--arg xs", "JSON"]),
    (["--arg", "q=a", "--arg", "q=b"], ["--arg q", "twice"]),
    (["--arg", "q=@/nope/q.txt"], ["--arg q", "/nope/q.txt"]),
    ([], ["missing --arg for q"]),
    (["--arg", "q=a", "--program", "nope"], ["no program 'nope'"]),
    (["--arg", "q=a", "--seed", "-1"], ["--seed"]),
    (["--arg", "q=a", "--max-nodes", "0"], ["--max-nodes"]),
])
def test_run_bad_arguments(env, script, args, needles):
    out = dendrite("run", str(script), *args, env=env)
    if any(a in ("--seed", "--max-nodes") for a in args):
        assert_usage_error(out, "dendrite run", *needles)
    else:
        assert_one_line(out, 2, "dendrite run", *needles)


def test_run_at_at_escape_and_typed_arguments(env, script):
    # (@file is read in test_run_json_quiet)
    out = dendrite("run", str(script), "--quiet", "--arg", "q=@@handle", "--arg", "flag=yes",
                   "--arg", "xs=[3]", "--arg", "n=2", env=env)
    assert out.returncode == 0, out.stderr
    # the program's prompt is the literal "@handle": the tree's root shows it
    assert "@handle" in out.stdout and "@@handle" not in out.stdout


STREAM_SCRIPT = '''\
program p(q):
    "{q}"
    gen head(max_tokens=6, temperature=0)
    fork 2 as b:
        gen tail(max_tokens=6, temperature=1.0)
    return collect(head + tail)
'''


def test_run_stream_prints_the_first_branch_as_it_goes(env, engine, tmp_path):
    from dendrite.dsl import load

    script = tmp_path / "s.dendrite"
    script.write_text(STREAM_SCRIPT)
    first, second = load(script).run(engine, seed=0, q="Q:").value
    assert first != second  # so streaming the second branch too would show
    out = dendrite("run", str(script), "--stream", "--arg", "q=Q:", env=env)
    assert out.returncode == 0, out.stderr
    # The root's gen, then the first child's: streamed, then a blank line and
    # the usual result; the second branch is only in the result.
    assert out.stdout.startswith(first + "\n\n"), (out.stdout, first)
    assert second in out.stdout[len(first) + 2:]
    assert "[dendrite]" not in out.stderr  # no progress line


def test_run_stream_and_json_is_a_usage_error(env, script):
    out = dendrite("run", str(script), "--stream", "--json", "--arg", "q=a", env=env)
    assert_one_line(out, 2, "dendrite run", "--stream", "--json")
    assert out.stdout == ""


def test_run_a_directory(env, tmp_path):
    out = dendrite("run", str(tmp_path), "--arg", "q=a", env=env)
    assert_one_line(out, 2, "dendrite run", str(tmp_path), "directory")


def test_run_unknown_script(env):
    assert_one_line(dendrite("run", "no_such_script", env=env), 2, "dendrite run",
                    "no such script")


def test_run_script_that_does_not_compile(env, tmp_path):
    bad = tmp_path / "bad.dendrite"
    bad.write_text("program t(q):\n    gen x(temprature=1)\n")
    out = dendrite("run", str(bad), "--arg", "q=1", env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"{bad}:2:11: unknown gen option 'temprature'")
    assert out.stderr.rstrip().endswith("^")


def test_run_script_error_while_running(env, tmp_path):
    rt = tmp_path / "rt.dendrite"
    rt.write_text('program p(q, r="a"):\n    "{q}"\n    gen x(max_tokens=2, regex=r)\n'
                  '    return 1 / 0\n')
    out = dendrite("run", str(rt), "--quiet", "--arg", "q=a", env=env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"{rt}:4:12: ZeroDivisionError: division by zero")
    assert "Traceback" not in out.stderr
    out = dendrite("run", str(rt), "--quiet", "--arg", "q=a", "--arg", "r=(", env=env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"{rt}:3:9: invalid regex")  # a GrammarError, located


def test_run_unwritable_tree_is_checked_before_the_model_loads(env, script, model, tmp_path):
    broken = tmp_path / "broken"  # were the model loaded first, this would be the error
    shutil.copytree(model, broken)
    (broken / "config.json").unlink()
    out = dendrite("run", str(script), "--arg", "q=a", "--model", str(broken),
                   "--tree", "/nope/tot.html", env=env)
    assert_one_line(out, 2, "dendrite run", "--tree", "/nope", "does not exist")
    out = dendrite("run", str(script), "--arg", "q=a", "--tree", str(tmp_path), env=env)
    assert_one_line(out, 2, "dendrite run", "--tree", "directory")


def test_run_model_and_device_errors(env, script, tmp_path):
    out = dendrite("run", str(script), "--arg", "q=a", "--model", str(tmp_path / "nope"), env=env)
    assert_one_line(out, 2, "dendrite run", "--model", "does not exist")
    out = dendrite("run", str(script), "--arg", "q=a", "--device", "tpu", env=env)
    assert_one_line(out, 2, "dendrite run", "--device", "tpu")


def test_ctrl_c_exits_130_without_traceback(env, tmp_path):
    forever = tmp_path / "forever.dendrite"
    forever.write_text('program f():\n    "Go"\n    repeat 100000:\n'
                       '        gen x(max_tokens=16, temperature=1.0)\n    return x\n')
    p = subprocess.Popen([*CLI, "run", str(forever)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, encoding="utf-8")
    err: list[str] = []
    # The progress line says the program is running; interrupt it then.
    for line in p.stderr:
        err.append(line)
        if line.startswith("[dendrite] step"):
            p.send_signal(signal.SIGINT)
            break
    rest = threading.Thread(target=lambda: err.append(p.stderr.read()))
    rest.start()
    rc = p.wait(timeout=120)
    rest.join()
    text = "".join(err)
    assert rc == 130, text
    assert "Traceback" not in text
    assert "dendrite run: interrupted" in text


# ------------------------------------------------------------------------- demo


def test_demo_with_every_flag(env):
    out = dendrite("demo", "--context", "1000", "--forks", "20", "--page-size", "16",
                   "--write", "2", env=env)
    assert out.returncode == 0, out.stderr
    assert "after 20 forks 63 (+0)" in out.stdout
    assert "20 copy-on-write page copies" in out.stdout


@pytest.mark.parametrize("argv, flag", [
    (["--context", "0"], "--context"),
    (["--forks", "-1"], "--forks"),
    (["--forks", "0"], "--forks"),
    (["--page-size", "0"], "--page-size"),
    (["--write", "-1"], "--write"),
    (["--context", "lots"], "--context"),
])
def test_demo_bad_values(env, argv, flag):
    assert_usage_error(dendrite("demo", *argv, env=env), "dendrite demo", flag)


# ------------------------------------------------- --traceback and error classes


def test_traceback_flag_shows_the_traceback(env, model, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(model, d)
    (d / "config.json").unlink()
    for argv in (["--traceback", "generate", "hi", "--model", str(d)],
                 ["generate", "hi", "--model", str(d), "--traceback"]):
        out = dendrite(*argv, env=env)
        assert out.returncode == 1
        assert "Traceback (most recent call last)" in out.stderr


def _raise(exc: BaseException):
    def f() -> int:
        raise exc
    return f


def test_error_classes_and_exit_status(capsys):
    from dendrite.cli import UsageError, run_command
    from dendrite.engine import LeafTooLarge, ModelOutputError

    cases = [
        (UsageError("--x: bad"), 2, "dendrite t: error: --x: bad"),
        (ValueError("bad value"), 1, "dendrite t: error: bad value"),
        (LeafTooLarge("leaf needs 9 pages, pool has 8"), 1, "leaf needs 9 pages"),
        (ModelOutputError("NaN logits"), 1, "NaN logits"),
        (PermissionError(13, "Permission denied", "/x/t.html"), 1, "/x/t.html"),
        (KeyboardInterrupt(), 130, "dendrite t: interrupted"),
        (ZeroDivisionError("division by zero"), 70,
         "this is a bug in dendrite; rerun with --traceback for details"),
    ]
    for exc, rc, text in cases:
        assert run_command(_raise(exc), prog="dendrite t") == rc
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2
    with pytest.raises(ZeroDivisionError):
        run_command(_raise(ZeroDivisionError()), prog="dendrite t", traceback=True)


def test_closed_stdout_exits_quietly(env):
    """`dendrite ... | head`: the reader goes away; no error, no traceback, 141."""
    code = (
        "import sys\n"
        "from dendrite.cli import run_command\n"
        "def write_lots():\n"
        "    for _ in range(1000):\n"  # 64 MB: far more than a pipe holds
        "        sys.stdout.write('x' * 65536); sys.stdout.flush()\n"
        "    return 0\n"
        "sys.exit(run_command(write_lots, prog='dendrite t'))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.read(10)
    p.stdout.close()  # the writer blocks on the full pipe until this, then gets EPIPE
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err
    assert err == ""


# ------------------------------------------------------------------------ serve
# A live `dendrite serve` (requests, signals, metrics) is tested in
# tests/server/test_serve_process.py; here: its command line and load errors.


@pytest.mark.parametrize("argv, flag", [
    (["--port", "65536"], "--port"),
    (["--port", "x"], "--port"),
    (["--num-pages", "0"], "--num-pages"),
    (["--max-request-bytes", "0"], "--max-request-bytes"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    (["--max-handles-per-key", "0"], "--max-handles-per-key"),
    (["--max-fork", "0"], "--max-fork"),
    (["--handle-ttl", "0"], "--handle-ttl"),
    (["--max-program-seconds", "inf"], "--max-program-seconds"),
    (["--log-level", "loud"], "--log-level"),
])
def test_serve_bad_values_are_usage_errors(env, argv, flag):
    assert_usage_error(dendrite("serve", *argv, env=env), "dendrite serve", flag)


def test_serve_model_and_device_errors_before_loading(env, tmp_path):
    out = dendrite("serve", "--model", str(tmp_path / "nope"), "--model-name", "m",
                   "--api-key", "k", "--host", "127.0.0.1", env=env)
    assert_one_line(out, 2, "dendrite serve", "--model", "does not exist")
    out = dendrite("serve", "--device", "tpu", env=env)
    assert_one_line(out, 2, "dendrite serve", "--device", "tpu")


def test_serve_model_dir_that_fails_to_load(env, model, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(model, d)
    (d / "config.json").unlink()
    out = dendrite("serve", "--model", str(d), "--port", "0", env=env)
    assert_one_line(out, 1, "dendrite serve", "config.json")


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra(env, model, missing):
    # The module is made unimportable, as when the extra is not installed.
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from dendrite.cli import main\n"
            f"sys.exit(main(['serve', '--model', {str(model)!r}, '--port', '0']))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert_one_line(out, 2, "dendrite serve", missing, 'pip install ".[serve]"')


@pytest.mark.parametrize("spec", ["ngram:k=4,n=2", "model:{model},k=3,width=2"])
def test_generate_speculative_prints_the_plain_text(env, model, spec):
    """--speculative is exact: the greedy text is the plain run's; stderr has the
    acceptance statistics."""
    args = ["The quick brown fox. The quick brown fox. The quick", "--model", str(model),
            "--device", "cpu", "--max-tokens", "16"]
    plain = dendrite("generate", *args, env=env)
    spec_out = dendrite("generate", *args, "--speculative", spec.format(model=model), env=env)
    assert plain.returncode == 0 and spec_out.returncode == 0, spec_out.stderr
    assert spec_out.stdout == plain.stdout
    assert "mean acceptance length" in spec_out.stderr


@pytest.mark.parametrize("sub", ["generate", "run"])
@pytest.mark.parametrize("spec,needle", [("beam", "unknown method 'beam'"),
                                         ("ngram:k=0", "num_draft must be an int >= 1"),
                                         ("model:/no/such/dir", "does not exist")])
def test_bad_speculative_is_a_usage_error(env, sub, spec, needle):
    args = ["hi"] if sub == "generate" else ["tot"]
    out = dendrite(sub, *args, "--speculative", spec, env=env)
    assert_usage_error(out, f"dendrite {sub}", "--speculative", needle)

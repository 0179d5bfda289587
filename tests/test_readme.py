"""The README's DSL example and .dendrite script run exactly as printed.

DENDRITE_MODEL points `Engine()` at a tiny model so that the snippets run
unchanged on CI without the built-in model's conversion.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dendrite.testing import build_tiny_model

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
    dsl = [b for b in _blocks("python") if "@dendrite.program" in b]
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

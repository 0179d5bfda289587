"""The issue-16 benchmark scripts on the tiny model: one --quick run of each, shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling bench_common


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dendrite.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bench-model") / "llama", "llama")


@pytest.fixture(scope="session")
def bench_env() -> dict[str, str]:
    # One intra-op thread: on a shared 2-core machine torch's thread pool spins
    # against the other processes and a tiny model's step slows ~100x.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def run_script(name: str, args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def quick_results(tmp_path_factory, tiny_model, bench_env) -> dict[str, dict]:
    """bench_tot_gsm8k.py and bench_wall.py in --quick mode on CPU, as the CLI runs them."""
    out = tmp_path_factory.mktemp("bench-out")
    results = {}
    for key, script in (("tot", "bench_tot_gsm8k.py"), ("wall", "bench_wall.py")):
        path = out / f"{key}.json"
        p = run_script(script, ["--model", str(tiny_model), "--device", "cpu", "--quick",
                                "--out", str(path)], bench_env)
        assert p.returncode == 0, p.stderr[-3000:]
        results[key] = {"json": json.loads(path.read_text()), "path": path,
                        "stdout": p.stdout, "md": path.with_suffix(".md").read_text()}
    return results


@pytest.fixture
def one_thread():
    """In-process model runs with one intra-op thread (see bench_env), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

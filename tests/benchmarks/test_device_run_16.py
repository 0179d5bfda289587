"""device_run_16.sh end to end on the CPU (--quick): every stage, every file in $OUT."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow  # ~20 s on a quiet 2-core machine: both scripts plus the plot
def test_wrapper_quick_on_cpu(tiny_model, bench_env, tmp_path):
    out = tmp_path / "out16"
    p = subprocess.run(["bash", "benchmarks/device_run_16.sh", "--model", str(tiny_model),
                        "--device", "cpu", "--quick"], cwd=REPO, capture_output=True, text=True,
                       env={**bench_env, "OUT": str(out)}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("tot.json", "tot.md", "wall.json", "wall.md", "run.log"):
        assert (out / name).is_file(), name
    assert "== tot: rc=0" in p.stdout and "== wall: rc=0" in p.stdout
    for name in ("tot", "wall"):
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        assert rows and not [r for r in rows if r.get("skipped") or r.get("error")]
    assert "| workload | system |" in p.stdout and "| case | system |" in p.stdout


def test_wrapper_rejects_unknown_arguments(tmp_path):
    p = subprocess.run(["bash", "benchmarks/device_run_16.sh", "--models", "x"], cwd=REPO,
                       capture_output=True, text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       timeout=30)
    assert p.returncode == 2 and "unknown argument --models" in p.stderr

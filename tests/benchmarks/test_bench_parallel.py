"""bench_parallel.py --quick on the CPU: every section runs (TP=2 over gloo,
replicas x1/x2 on the tiny model) and writes its table; the CUDA-only
all-reduce section says it was skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name, args, env, timeout):
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=BENCH.parent)


def test_quick_run_writes_every_section(tmp_path, bench_env):
    out = tmp_path / "par.json"
    p = run_script("bench_parallel.py", ["--quick", "--device", "cpu", "--model", "tiny",
                                         "--out", str(out)], bench_env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    plan = [r for r in rows if r["section"] == "plan"]
    assert {r["method"].split()[0] for r in plan} == {"packed", "pickle",
                                                     "broadcast_object_list"}
    assert [r for r in rows if r["section"] == "allreduce"][0]["skipped"]
    decode = {r["tp"]: r for r in rows if r["section"] == "decode"}
    assert set(decode) == {1, 2}
    assert decode[2]["single_ms_per_token"] > 0 and decode[2]["branch16_speedup"] > 0
    reps = {r["replicas"]: r for r in rows if r["section"] == "replicas"}
    assert reps[1]["gen_tokens"] == reps[2]["gen_tokens"] > 0  # same seeds, same work
    assert "## decode" in out.with_suffix(".md").read_text()

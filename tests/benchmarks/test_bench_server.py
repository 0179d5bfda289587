"""Smoke test: benchmarks/bench_server.py --quick runs on CPU as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]


def test_bench_server_quick(tmp_path):
    out = tmp_path / "server.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_server.py"), "--quick",
                        "--device", "cpu", "--out", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [(x["clients"], x["stream"]) for x in res["load"]] == \
        [(c, s) for c in (1, 8, 64) for s in (False, True)]
    for x in res["load"]:
        # ignore_eos: every request generates exactly max_tokens
        assert x["tokens"] == x["requests"] * res["max_tokens"]
        assert 0 < x["p50_s"] <= x["p99_s"] and x["tokens_per_s"] > 0
    assert [b["way"] for b in res["best_of_8"]] == \
        ["n=8", "8 separate requests", "fork: sequences + fork + 8 generates"]
    assert "| clients | stream |" in r.stdout and "| n=8 |" in r.stdout

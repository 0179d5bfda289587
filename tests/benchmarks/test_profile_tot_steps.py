"""profile_tot_steps.py, run as a user runs it, on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import BENCH, REPO


def test_profile_tot_steps_classifies_every_step(tiny_model, bench_env):
    out = subprocess.run(
        [sys.executable, str(BENCH / "profile_tot_steps.py"), "--model", str(tiny_model),
         "--device", "cpu", "--questions", "2", "--max-tokens", "4"],
        cwd=REPO, env=bench_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for label in ("pass 1, as run", "pass 2, device synchronized"):
        m = re.search(label + r".*?, (\d+) steps,.*?\n((?:\|.*\n?)+)", out.stdout)
        assert m, out.stdout
        steps = int(m.group(1))
        rows = [r for r in m.group(2).splitlines()[2:] if r.startswith("| eager")]
        # On the CPU every step is eager, and the table accounts for each one.
        assert rows and sum(int(r.split("|")[3]) for r in rows) == steps
        assert any("with prefill" in r for r in rows) and any("decode" in r for r in rows)

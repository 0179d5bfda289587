"""bench_speculative.py --quick on the tiny model: every table is filled, every
speculative row reproduces the plain run's tokens, and the controlled target
at noise 0 computes exactly the draft's function (every draft accepted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_speculative as B
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, args: list[str], env: dict[str, str], timeout: float):
    # (Not conftest's: `conftest` may name another directory's when several
    # test directories are collected together.)
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
                          check=False)


def test_quick_run(tmp_path, tiny_model, bench_env):
    out = tmp_path / "spec.json"
    p = run_script("bench_speculative.py", ["--model", str(tiny_model), "--device", "cpu",
                                            "--quick", "--out", str(out)], bench_env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    rule = [r for r in rows if r["case"] == "rule"]
    assert [r["branches"] for r in rule] == [1, 4] and all(r["break_even"] > 0 for r in rule)
    spec = [r for r in rows if r["case"] != "rule" and r["config"] != "off"]
    assert {r["case"] for r in spec} == {"ngram-repeat", "self-draft", "self-draft T=0.8",
                                         "controlled noise=0.0", "controlled ngram-repeat"}
    assert all(r.get("same", True) for r in spec), spec
    assert next(r for r in spec if r["config"].endswith("drawn")).get("same") is None
    self_draft = next(r for r in spec if r["case"] == "self-draft")
    assert self_draft["accept_len"] > 2.5
    assert "Acceptance and speed" in out.with_suffix(".md").read_text()


def _greedy(model_dir):
    """8 greedy tokens with their top-2 logprobs, on the CPU."""
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams

    e = Engine(model_dir, device="cpu", num_pages=64)
    r = e.generate(e.new_sequence("The quick brown fox"),
                   SamplingParams(temperature=0, max_tokens=8, logprobs=2))[0]
    e.close()
    return r


def _same_function(a, b, atol):
    ra, rb = _greedy(a), _greedy(b)
    assert ra.token_ids == rb.token_ids
    torch.testing.assert_close(torch.tensor(ra.logprobs), torch.tensor(rb.logprobs),
                               atol=atol, rtol=0)
    return ra


def test_controlled_target_at_noise_zero_is_the_draft(tmp_path, tiny_model, one_thread):
    t = B.controlled_target(tiny_model, tmp_path / "t", extra=3, noise=0.0, seed=0)
    cfg = json.loads((t / "config.json").read_text())
    assert cfg["num_hidden_layers"] == json.loads(
        (tiny_model / "config.json").read_text())["num_hidden_layers"] + 3
    _same_function(tiny_model, t, atol=1e-5)


def test_wide_target_at_noise_zero_is_the_draft(tmp_path, tiny_model, one_thread):
    base = json.loads((tiny_model / "config.json").read_text())
    t = B.wide_target(tiny_model, tmp_path / "t", factor=4,
                      intermediate=3 * base["intermediate_size"], noise=0.0, seed=0)
    cfg = json.loads((t / "config.json").read_text())
    assert cfg["hidden_size"] == 4 * base["hidden_size"]
    assert cfg["num_attention_heads"] == 4 * base["num_attention_heads"]
    assert cfg["num_key_value_heads"] == 4 * base["num_key_value_heads"]
    draft = _same_function(tiny_model, t, atol=1e-4)
    # Noise on the copied neurons moves the logits: the target is no longer the draft.
    n = B.wide_target(tiny_model, tmp_path / "n", factor=4,
                      intermediate=3 * base["intermediate_size"], noise=1.0, seed=0)
    assert not torch.allclose(torch.tensor(_greedy(n).logprobs), torch.tensor(draft.logprobs),
                              atol=1e-2)
    with pytest.raises(ValueError, match="power of 4"):
        B.wide_target(tiny_model, tmp_path / "x", factor=2, intermediate=1024, noise=0.0, seed=0)

"""bench_fp8_weights.py: its CPU dry run (--quick, tiny shape) writes every row."""

from __future__ import annotations

import json

from conftest import run_script


def test_quick_dry_run_writes_every_row(tmp_path, bench_env):
    out = tmp_path / "f.json"
    p = run_script("bench_fp8_weights.py", ["--quick", "--device", "cpu", "--model-dir",
                                            str(tmp_path / "m"), "--out", str(out)], bench_env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["device"] == "cpu"
    kernels = res["kernels"]
    assert {(r["proj"], r["rows"], r["format"]) for r in kernels} == {
        (proj, m, f) for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
        for m in (1, 16) for f in ("none", "fp8", "mxfp8")}
    assert all(r["us"] > 0 for r in kernels)
    # An e4m3 weight is a byte an element plus its scales: about half of bf16's two,
    # a quarter of the dry run's float32.
    by = {(r["proj"], r["rows"], r["format"]): r["weight_bytes"] for r in kernels}
    assert by[("down_proj", 1, "fp8")] < 0.3 * by[("down_proj", 1, "none")]
    model = {r["format"]: r for r in res["model"]}
    assert list(model) == ["none", "fp8", "mxfp8"]
    assert [model[f]["weights"] for f in model] == ["none", "fp8", "mxfp8"]
    assert model["none"]["logits_rel_l2_vs_bf16"] == 0.0
    assert 0 < model["fp8"]["logits_rel_l2_vs_bf16"] < 0.15
    assert 0 < model["mxfp8"]["logits_rel_l2_vs_bf16"] < 0.15
    assert model["fp8"]["weight_bytes"] < model["none"]["weight_bytes"]
    assert all(r["single_ms"] > 0 and r["branches16_ms"] > 0 for r in model.values())
    assert "| fp8 |" in p.stdout and "16 branches ms/step" in p.stdout

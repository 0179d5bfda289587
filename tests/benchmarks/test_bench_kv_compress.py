"""bench_kv_compress.py on the tiny model (CPU): bytes and accuracy tables, one small run."""

from __future__ import annotations

import json

from conftest import run_script


def test_bytes_and_accuracy_tables(tmp_path, tiny_model, bench_env):
    out = tmp_path / "kv.json"
    p = run_script("bench_kv_compress.py", ["--model", str(tiny_model), "--device", "cpu",
                                            "--dtype", "float32", "--tokens", "48",
                                            "--out", str(out)], bench_env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tokens"] == 48
    rows = {row["format"]: row for row in r["accuracy"]}
    base = rows["float32 (baseline)"]
    assert base["top1_agree"] == 1.0 and base["kl"] == 0.0
    # tiny model: 2 layers, 2 KV heads of 16 -> int4 rows of 8 code bytes + 4 scale bytes
    assert rows["int4"]["bytes_per_token"] == 2 * 2 * 2 * 12
    for name in ("int4", "int4 g32", "int4 no-rotation", "int3", "int3 g32", "fp8_e4m3"):
        row = rows[name]
        assert 0 < row["top1_agree"] <= 1 and row["kl"] >= 0, row
        assert 0 < row["attn_rel_err_mean"] <= row["attn_rel_err_max"] < 1, row
    assert rows["int4"]["attn_rel_err_mean"] < rows["int3"]["attn_rel_err_mean"]
    llama = r["bytes_per_token"]["Llama-3.1-8B"]
    assert llama["bf16"] == 32 * 2 * 8 * 128 * 2 and llama["int4"] == 32 * 2 * 8 * (64 + 4)
    assert "| int4 | 96 |" in out.with_suffix(".md").read_text()

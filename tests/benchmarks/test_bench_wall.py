"""bench_wall.py: the weight-bytes and bandwidth helpers, and a --quick run."""

from __future__ import annotations

import json

import pytest
import torch

import bench_wall as W


def test_weight_bytes_count_every_weight_once_but_a_gathered_embedding(tmp_path):
    from safetensors import safe_open

    from dendrite.tiny_model import build_tiny_model

    for tied in (False, True):
        d = build_tiny_model(tmp_path / f"m{tied}", "llama", tie_word_embeddings=tied)
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            numel = {k: f.get_tensor(k).numel() for k in f.keys()}
        total = sum(numel.values())
        per_token, all_bytes = W.weight_bytes_per_token(d, torch.bfloat16)
        assert all_bytes == 2 * total
        embed = numel["model.embed_tokens.weight"]
        # tied: the embedding is the lm_head and read in full; untied: a one-row gather
        assert per_token == (2 * total if tied else 2 * (total - embed))


def test_copy_bandwidth_is_cuda_only():
    assert W.copy_bandwidth(torch.device("cpu")) is None


def test_quick_run_has_every_case(quick_results):
    q = quick_results["wall"]
    rows = q["json"]["rows"]
    assert not [r for r in rows if r.get("error") or r.get("skipped")], rows
    by = {(r["case"], r["system"], r["mode"]) for r in rows}
    assert ("single", "Dendrite", "Engine.generate") in by
    assert ("single", "HF transformers", "generate, dynamic cache") in by
    assert sum(c == "best_of_16" and s == "HF transformers" for c, s, _ in by) == 2
    assert any(c == "best_of_16" and s == "Dendrite" for c, s, _ in by)
    dsl = [r for r in rows if r["case"] == "dsl"]
    assert {r["mode"].split()[0] for r in dsl} == {"tot.dendrite", "self_consistency.dendrite"}
    for r in rows:
        assert r["wall_s"] > 0 and r["wall_min_s"] <= r["wall_s"] and r["tok_per_s"] > 0
        if r["case"] == "single":
            assert r["tokens"] == 8 and r["ms_per_token"] > 0 and r["ttft_ms"] > 0
            assert "pct_roofline" not in r  # no copy bandwidth on the CPU
        if r["case"] == "dsl":
            assert r["engine_steps"] > 0 and r["gen_tokens"] > 0
    env = q["json"]["env"]
    assert env["copy_bandwidth_Bps"] is None and env["weight_bytes_per_token"] > 0
    assert env["bo_prompt_tokens"] <= 64 + 2  # --quick's prompt, cut at 64 tokens
    header = "| case | system | mode |"
    assert header in q["stdout"] and header in q["md"]


@pytest.mark.parametrize("args, message", [
    (["--cases", "single,fast"], "--cases: unknown fast"),
    (["--tokens", "0"], "--tokens must be >= 1"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        W.parse(["--out", "x.json", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_results_json_is_readable_after_each_row(quick_results):
    """The file on disk is always whole JSON (written to a temp file, then renamed)."""
    path = quick_results["wall"]["path"]
    assert json.loads(path.read_text())["benchmark"] == "wall"
    assert not path.with_suffix(path.suffix + ".tmp").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_busy_time_counts_kernels_not_host_gaps():
    import time

    a = torch.randn(2048, 2048, device="cuda")

    def work() -> None:
        for _ in range(4):
            a @ a
            torch.cuda.synchronize()
            time.sleep(0.05)  # host time the GPU is idle

    device = torch.device("cuda")
    work()  # cuBLAS warm-up
    busy = W.gpu_busy_seconds(work, device)
    assert 0 < busy < 0.1  # four 2048^3 matmuls, not the 0.2 s of sleeps

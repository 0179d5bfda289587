"""bench_quant.py and bench_quant_speed.py: CPU dry runs on tiny models, and the harness's arithmetic."""

from __future__ import annotations

import json
import math
import subprocess

import bench_quant as bq
import pytest
from conftest import REPO, run_script

QUANT_CONFIGS = "bf16,bf16,fp8kv,fp8w,int4kv"


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, tiny_model, bench_env):
    out = tmp_path_factory.mktemp("quant") / "q.json"
    p = run_script("bench_quant.py", ["--model", str(tiny_model), "--device", "cpu",
                                      "--tokens", "128", "--window", "64", "--gsm8k", "2",
                                      "--gsm8k-max-tokens", "6", "--configs", QUANT_CONFIGS,
                                      "--out", str(out)], bench_env)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"json": json.loads(out.read_text()), "stdout": p.stdout,
            "md": out.with_suffix(".md").read_text()}


def test_bf16_against_itself_is_exact(quant_run):
    rows = quant_run["json"]["rows"]
    assert [r["config"] for r in rows] == QUANT_CONFIGS.split(",")
    ref, again = rows[0], rows[1]
    assert ref["reference"] and not again["reference"]
    assert ref["status"] == again["status"] == "ok"
    assert quant_run["json"]["ppl_tokens"] == 2 * 63  # 2 windows, first token of each is context
    assert again["ppl"] == ref["ppl"] and again["ppl_delta_pct"] == 0.0
    assert again["positions"] == 126 and 0 < again["decidable"] <= 126
    assert again["top1_agree_pct"] == 100.0 and again["top1_agree_all_pct"] == 100.0
    assert again["mean_abs_dlogprob"] == 0.0
    assert again["gsm8k"]["answers"] == ref["gsm8k"]["answers"]
    assert again["gsm8k_same"] == 2 and again["gsm8k_delta_pts"] == 0.0
    assert again["kv_bytes_per_token"] == ref["kv_bytes_per_token"] > 0


def test_every_other_config_is_measured_or_reported(quant_run):
    for r in quant_run["json"]["rows"][2:]:
        if r["status"] == "ok":  # the option has landed: it must produce every figure
            assert math.isfinite(r["ppl"]) and r["top1_agree_pct"] is not None, r
            assert r["cpu_emulation"] and r["gsm8k"]["n"] == 2
        else:
            assert r["status"].startswith("not available: "), r
            assert "ppl" not in r
            assert f"| {r['config']} |" in quant_run["stdout"]
    gates = {g["config"]: g for g in quant_run["json"]["gates"]}
    assert set(gates) == {"fp8kv", "fp8w"}
    for g in gates.values():
        assert g["verdict"] in ("PASS", "FAIL") or g["verdict"].startswith("not measured")


def test_table_and_capacity(quant_run):
    md = quant_run["md"]
    assert md in quant_run["stdout"]
    header = next(line for line in md.splitlines() if line.startswith("| config | ppl"))
    assert "top-1 agree % (decidable)" in header and "GSM8K acc %" in header
    cap = quant_run["json"]["capacity"]
    assert [(c["model"], c["kv"]) for c in cap][3:] == [
        ("Llama-3.1-8B shape", k) for k in ("bf16", "fp8_e4m3", "int4")]
    llama_bf16 = cap[3]
    assert llama_bf16["bytes_per_token"] == 32 * 2 * 8 * 128 * 2  # layers, K+V, heads, dim, bytes
    assert llama_bf16["max_context"] == 8 * (1 << 30) // (32 * 2 * 8 * 128 * 2)
    for c in cap:  # a smaller format never holds less
        same = [x for x in cap if x["model"] == c["model"]]
        assert c["max_context"] >= same[0]["max_context"]


def test_an_engine_refusing_a_config_is_a_row(monkeypatch, tmp_path, tiny_model, one_thread):
    monkeypatch.setitem(bq.PARTS, "bogus", {"no_such_engine_option": True})
    d = bq.main(["--model", str(tiny_model), "--device", "cpu", "--tokens", "64", "--window",
                 "32", "--gsm8k", "0", "--configs", "bogus,bf16", "--out",
                 str(tmp_path / "q.json")])
    bogus, bf16 = d["rows"]
    assert bogus["status"].startswith("not available: TypeError")
    assert "no_such_engine_option" in bogus["status"]
    assert bf16["status"] == "ok" and "ppl_delta_pct" not in bf16  # no reference to compare with
    assert any("did not run" in n for n in d["notes"])
    assert d["gates"] == []  # neither is gated; a gated config without a reference:
    row = {"config": "fp8kv", "status": "ok", "ppl": 1.0}
    assert bq.gate_verdicts([row])[0]["verdict"] == "not measured (no reference)"


def test_config_names():
    assert bq.config_kwargs("bf16") == {}
    assert bq.config_kwargs("fp8kv+fp8w") == {"kv_dtype": "fp8_e4m3", "quantization": "fp8"}
    with pytest.raises(ValueError, match="unknown configuration part 'fp9'.*allowed: bf16"):
        bq.config_kwargs("fp9")
    with pytest.raises(ValueError, match="sets kv_dtype twice"):
        bq.config_kwargs("fp8kv+int4kv")


def test_bad_arguments_exit_with_the_argument_named(capsys):
    import bench_quant_speed as bqs

    with pytest.raises(SystemExit) as e:
        bq.parse_args(["--configs", "bf16,fp9", "--out", "x.json"])
    assert e.value.code == 2
    assert "--configs: unknown configuration part 'fp9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bq.parse_args(["--window", "0", "--out", "x.json"])
    assert "--window must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bqs.parse_args(["--quick", "--branches", "0", "--out", "y.json"])
    assert "--branches must be >= 1, got 0" in capsys.readouterr().err


def test_agreement_counts_decidable_positions():
    ref = [[(1, -0.1), (2, -0.5)], [(3, -1.0), (4, -1.05)], [(5, -0.2), (6, -2.0)]]
    top = [[(1, -0.2), (2, -0.4)], [(4, -1.0), (3, -1.1)], [(6, -0.3), (5, -0.4)]]
    a = bq.agreement(ref, top, margin=0.1)
    # position 1 is not decidable (gap 0.05); of the other two, the first agrees
    by = a.pop("by_margin")
    assert a == {"decidable": 2, "positions": 3, "top1_agree_pct": 50.0,
                 "top1_agree_all_pct": 100.0 / 3}
    assert by["0.1"] == [2, 50.0] and by["0.25"] == [2, 50.0]  # gaps 0.4 and 1.8
    assert by["0.5"] == [1, 0.0] and by["1.0"] == [1, 0.0]  # only the third, which differs
    assert bq.ppl_of([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert bq.windows(list(range(10)), 9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] scores nothing


def test_speed_quick_run(tmp_path, bench_env):
    out = tmp_path / "s.json"
    p = run_script("bench_quant_speed.py", ["--quick", "--device", "cpu", "--steps", "2",
                                            "--warmup", "1", "--prefix", "64", "--configs",
                                            "bf16,fp8kv+fp8w", "--model-dir", str(tmp_path / "m"),
                                            "--out", str(out)], bench_env)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert [r["config"] for r in rows] == ["bf16", "fp8kv+fp8w"]
    for r in rows:
        if r["status"] == "ok":
            assert r["single_ms"] > 0 and r["b1_ms"] > 0 and r["bn_ms"] > 0
            assert r["branch_ratio"] == pytest.approx(r["bn_ms"] / r["b1_ms"])
        else:
            assert r["status"].startswith("not available: "), r
    assert rows[0]["status"] == "ok" and rows[0]["speedup"] == 1.0
    assert d["args"]["prefix"] == 64 and d["args"]["branches"] == 4  # (--quick's)
    assert all("quick: not a measurement" in t["verdict"] for t in d["targets"])
    assert "| config | weights MB |" in p.stdout


def test_device_wrapper_rejects_unknown_arguments(tmp_path):
    p = subprocess.run(["bash", "benchmarks/device_run_quant.sh", "--models", "x"], check=False,
                       cwd=REPO, capture_output=True, text=True, timeout=30,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "unknown argument --models" in p.stderr


@pytest.mark.slow  # ~30 s: both scripts, every configuration, on the tiny models
def test_device_wrapper_quick_on_cpu(tiny_model, bench_env, tmp_path):
    out = tmp_path / "out17"
    p = subprocess.run(["bash", "benchmarks/device_run_quant.sh", "--model", str(tiny_model),
                        "--device", "cpu", "--quick"], check=False, cwd=REPO, capture_output=True,
                       text=True, env={**bench_env, "OUT": str(out)}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "== accuracy: rc=0" in p.stdout and "== speed: rc=0" in p.stdout
    for name in ("quant.json", "quant.md", "speed.json", "speed.md", "run.log"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "quant.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["bf16", "fp32", "fp8kv", "fp8w", "fp8kv+fp8w",
                                           "int4kv", "mxfp8w", "fp8w+head"]

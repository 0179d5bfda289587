"""The Tree-of-Thought GSM8K example runs (tiny model, few tokens)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tot_gsm8k.py"


def load_example():
    spec = importlib.util.spec_from_file_location("tot_gsm8k", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_data_and_license_ship_with_the_example():
    mod = load_example()
    rows = mod.load_questions(mod.DEFAULT_DATA)
    assert len(rows) == 5 and rows[0]["gold"] == 18
    lic = (mod.DEFAULT_DATA.parent / "LICENSE-gsm8k").read_text()
    assert "MIT License" in lic and "OpenAI" in lic


def test_example_runs(tiny_model_dir, tmp_path, capsys):
    mod = load_example()
    data = tmp_path / "q.jsonl"
    data.write_text((mod.DEFAULT_DATA).read_text().splitlines()[0] + "\n")
    rc = mod.main([str(data), "--model", str(tiny_model_dir), "--device", "cpu", "--limit", "2",
                   "--width", "2", "--keep", "1", "--depth", "1", "--step-tokens", "3",
                   "--tree", str(tmp_path / "t.html")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "accuracy " in out and "/1 " in out
    assert (tmp_path / "t.html").exists()

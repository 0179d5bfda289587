"""plot_headline.py: a PNG from the quick runs' JSONs; a clear skip without matplotlib."""

from __future__ import annotations

import sys

import pytest

import plot_headline as P


def test_headline_png_from_the_quick_runs(quick_results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "headline.png"
    rc = P.main(["--tot", str(quick_results["tot"]["path"]), "--wall",
                 str(quick_results["wall"]["path"]), "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_tot_latency_pairs_each_hf_row_with_its_dendrite_row(quick_results):
    lat = P.tot_latency(quick_results["tot"]["json"])
    systems = [(w, s) for w, s, _ in lat]
    for w in ("v0", "deep"):
        assert (w, "Dendrite") in systems and (w, "HF strong") in systems and (w, "HF naive") in systems
    assert all(v > 0 for _, _, v in lat)


def test_without_matplotlib_it_says_so_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    out = tmp_path / "x.png"
    assert P.main(["--out", str(out)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_no_results_is_an_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert P.main(["--tot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "no rows to plot" in err

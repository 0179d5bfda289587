"""Turn the JSONs of bench_tot_gsm8k.py and bench_wall.py into one headline figure.

    python benchmarks/plot_headline.py --tot tot.json --wall wall.json --out docs/benchmarks_headline.png

Panels: ToT seconds per question (Dendrite vs HF strong vs HF naive, same
questions and max_tokens, in-flight 1), Dendrite ToT throughput by in-flight
questions, single-stream ms/token, best-of-16 wall time. Every bar is a figure
from the given JSONs (same run); nothing is interpolated. Without matplotlib
it prints one line saying so and exits 0 (the JSONs and tables are the data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"Dendrite": "#2b7bb9", "HF strong": "#e08a2c", "HF naive": "#c0392b",
          "HF transformers": "#e08a2c"}


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    if not path.is_file():
        print(f"plot_headline: {path} not found; its panels are left out", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("skipped") and not r.get("error")]


def tot_latency(tot: dict) -> list[tuple[str, str, float]]:
    """(workload, system, s/question) of the HF rows at in-flight 1 and the Dendrite row they compare with."""
    rows = ok(tot["rows"])
    out = []
    for r in rows:
        if r["system"].startswith("HF") and r["in_flight"] == 1:
            base = next((b for b in rows if b["system"] == r.get("dendrite_row") and
                         b["workload"] == r["workload"] and b["in_flight"] == 1 and
                         b["max_tokens"] == r["max_tokens"]), None)
            if base and (r["workload"], "Dendrite", base["s_per_question"]) not in out:
                out.append((r["workload"], "Dendrite", base["s_per_question"]))
            out.append((r["workload"], r["system"], r["s_per_question"]))
    return out


def bars(ax, labels: list[str], values: list[float], colors: list[str], unit: str,
         log: bool = False) -> None:
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    if log and values and min(values) > 0:
        ax.set_yscale("log")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)


SHORT = {"Engine.generate": "generate", "generate, dynamic cache": "dynamic cache",
         "generate, static cache (compiled)": "static cache", "search.best_of_n.run": "best_of_n",
         "generate(num_return_sequences": "num_return_seq", "prompt prefilled once": "prefill once"}


def label(row: dict) -> str:
    mode = next((v for k, v in SHORT.items() if row["mode"].startswith(k)), row["mode"][:20])
    return f"{row['system'].replace(' transformers', '')}\n{mode}"


def color(system: str) -> str:
    for k, c in COLORS.items():
        if system.startswith(k):
            return c
    return "#7f8c8d"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tot", type=Path, help="bench_tot_gsm8k.py JSON")
    p.add_argument("--wall", type=Path, help="bench_wall.py JSON")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks_headline.png"))
    a = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_headline: matplotlib is not installed (pip install matplotlib); no figure "
              "written", file=sys.stderr)
        return 0
    tot, wall = load(a.tot), load(a.wall)
    panels = []
    if tot:
        lat = tot_latency(tot)
        if lat:
            panels.append(("ToT: seconds per question (in-flight 1, same settings)",
                           [f"{w} {s}" for w, s, _ in lat], [v for _, _, v in lat],
                           [color(s) for _, s, _ in lat], "s / question", True))
        thr = [r for r in ok(tot["rows"]) if r["system"] == "Dendrite"]
        if thr:
            panels.append(("Dendrite ToT throughput by questions in flight",
                           [f"{r['workload']} x{r['in_flight']}" for r in thr],
                           [r["tok_per_s"] for r in thr], [COLORS["Dendrite"]] * len(thr),
                           "generated tok/s", False))
    if wall:
        single = [r for r in ok(wall["rows"]) if r["case"] == "single"]
        if single:
            panels.append(("Single stream: ms per token (incl. host)",
                           [label(r) for r in single],
                           [r["ms_per_token"] for r in single],
                           [color(r["system"]) for r in single], "ms / token", False))
        bo = [r for r in ok(wall["rows"]) if r["case"].startswith("best_of")]
        if bo:
            panels.append((f"{bo[0]['case'].replace('_', '-')}: wall time",
                           [label(r) for r in bo],
                           [r["wall_s"] * 1e3 for r in bo], [color(r["system"]) for r in bo],
                           "ms", False))
    if not panels:
        print("plot_headline: no rows to plot (give --tot and/or --wall with results)",
              file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, labels, values, colors, unit, log) in zip(axes[0], panels):
        bars(ax, labels, values, colors, unit, log)
        ax.set_title(title, fontsize=9)
    env = (tot or wall or {}).get("env", {})
    fig.suptitle(f"Dendrite vs HF transformers, {Path(str(env.get('model_dir', ''))).name}, "
                 f"{env.get('gpu') or 'CPU'}, {env.get('date_utc', '')}", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"plot_headline: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

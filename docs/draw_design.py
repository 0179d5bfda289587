"""Draw the pictures of docs/design.md and regenerate its module tables.

    python docs/draw_design.py              # docs/layers.png, docs/step_flow.png, tables
    python docs/draw_design.py --table      # print the module tables (markdown)
    python docs/draw_design.py --check      # exit 1 if design.md's tables are stale

The module tables and the layer picture are built from the tree as it is:
every module file under dendrite/ is placed in a layer by the longest matching path prefix in
`LAYERS`, and its job is the first paragraph of its module docstring. A
module no prefix matches, or one without a docstring, stops the script with
a message naming it, so a new file cannot be left out silently.

design.md stays plain committed text: the tables sit between
`<!-- modules:KEY -->` and `<!-- /modules -->` markers, which `--write-doc`
(part of the default run) rewrites in place.

Needs matplotlib and Pillow for the pictures only (the `bench` extra).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "design.md"


@dataclass(frozen=True)
class Layer:
    key: str  # the marker name in design.md
    title: str
    #: Path prefixes (relative to the repository root) of the layer's modules.
    prefixes: tuple[str, ...]
    colour: str


#: Bottom to top: a module imports only from its own layer or those below.
LAYERS = (
    Layer("native", "native (C++)", ("dendrite/_native.pyi",), "#d9d9d9"),
    Layer("kv", "kv", ("dendrite/kv.py",), "#c6dbef"),
    Layer("model", "model / kernels / attention",
          ("dendrite/model/", "dendrite/kernels/", "dendrite/attention/", "dendrite/quant/",
           "dendrite/parallel/", "dendrite/transfer.py", "dendrite/default_model.py",
           "dendrite/tiny_model.py"),
          "#fdd0a2"),
    Layer("sampling", "sampling / grammar",
          ("dendrite/sampling.py", "dendrite/grammar/", "dendrite/stopping.py"), "#fcbba1"),
    Layer("engine", "engine", ("dendrite/engine.py", "dendrite/speculative/"), "#fc9272"),
    Layer("program", "program", ("dendrite/program/", "dendrite/tree_view.py",
                                 "dendrite/parallel/replicas.py"), "#c7e9c0"),
    Layer("search", "search", ("dendrite/search/",), "#a1d99b"),
    Layer("dsl", "dsl", ("dendrite/dsl/",), "#74c476"),
    Layer("cli", "cli / server",
          # "dendrite/cli": cli.py and the subcommand modules beside it (cli_*.py).
          ("dendrite/__init__.py", "dendrite/cli", "dendrite/demo.py", "dendrite/server/",
           "dendrite/program/cli_run.py"), "#dadaeb"),
)


def module_files(root: Path = ROOT) -> list[str]:
    """Every Python module file (and the native stub) of the package, as
    repository-relative paths, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "dendrite").rglob("*")
                  if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts)


def layer_of(path: str) -> Layer:
    """The layer whose longest prefix matches `path`."""
    best: tuple[int, Layer] | None = None
    for layer in LAYERS:
        for prefix in layer.prefixes:
            if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    if best is None:
        raise SystemExit(f"draw_design.py: {path} is in no layer: add its path to LAYERS")
    return best[1]


def job(path: str, root: Path = ROOT) -> str:
    """The first paragraph of the module docstring, on one line."""
    doc = ast.get_docstring(ast.parse((root / path).read_text(encoding="utf-8")))
    if not doc:
        raise SystemExit(f"draw_design.py: {path} has no module docstring (its one-line job)")
    para = " ".join(doc.split("\n\n")[0].split())
    return para.replace("|", "\\|")


def native_files(root: Path = ROOT) -> list[tuple[str, str]]:
    """(file, job) of the C++ core: each header's first comment paragraph, and
    bindings.cpp's (a `.cpp` beside a header implements it)."""
    out = []
    paths = sorted((root / "native").glob("*.h")) + [root / "native" / "bindings.cpp"]
    for p in paths:
        if not p.exists():
            continue
        para = []
        for line in p.read_text(encoding="utf-8").splitlines():
            text = line.removeprefix("//").strip()
            if not line.startswith("//") or not text:
                break
            para.append(text)
        job = re.sub(r"^\S+\s+-\s+", "", " ".join(para))  # "name.h - what it is"
        out.append((p.relative_to(root).as_posix(), job.replace("|", "\\|")))
    return out


def tables(root: Path = ROOT) -> dict[str, str]:
    """Markdown table of each layer's modules (and `native-files`), by marker key."""
    rows: dict[str, list[str]] = {layer.key: [] for layer in LAYERS}
    for path in module_files(root):
        rows[layer_of(path).key].append(f"| `{path}` | {job(path, root)} |")
    out = {key: "| module | job |\n| --- | --- |\n" + "\n".join(lines)
           for key, lines in rows.items() if lines}
    out["native-files"] = "| file | job |\n| --- | --- |\n" + "\n".join(
        f"| `{f}` | {text} |" for f, text in native_files(root))
    return out


_MARKER = re.compile(r"(<!-- modules:([\w-]+) -->\n)(.*?)(<!-- /modules -->)", re.DOTALL)


def render_doc(text: str, root: Path = ROOT) -> str:
    """`text` (design.md) with every marked table regenerated."""
    fresh = tables(root)
    seen = set()

    def sub(m: re.Match[str]) -> str:
        key = m.group(2)
        if key not in fresh:
            raise SystemExit(f"draw_design.py: design.md marks a table {key!r} that has no modules")
        seen.add(key)
        return f"{m.group(1)}{fresh[key]}\n{m.group(4)}"

    out = _MARKER.sub(sub, text)
    missing = sorted(set(fresh) - seen)
    if missing:
        raise SystemExit(f"draw_design.py: design.md has no table marker for {missing}")
    return out


# -- pictures ---------------------------------------------------------------------------


def _save(fig, out: Path) -> None:
    """PNG with a 64-colour palette (the pictures are flat colours and text:
    a quarter of the bytes, no visible change) and no timestamp."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    img = Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                                   dither=Image.Dither.NONE)
    img.save(out, format="PNG", optimize=True)


def _listing(paths: list[str], width: int) -> str:
    """Module names for a layer box: one line per package (`pkg/: a  b  c`),
    the package's own `__init__` left out, wrapped at `width` characters."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        parts = path.removeprefix("dendrite/").split("/")
        pkg = "/".join(parts[:-1])
        name = parts[-1].removesuffix(".pyi").removesuffix(".py")
        if name == "__init__":
            if pkg:
                groups.setdefault(pkg, [])
                continue
            name = "dendrite (__init__)"
        groups.setdefault(pkg, []).append(name)
    lines = []
    for pkg, names in groups.items():
        head = f"{pkg}/: " if pkg else ""
        lines.append(textwrap.fill(head + "  ".join(names), width,
                                   subsequent_indent=" " * len(head)))
    return "\n".join(lines) or "-"


def _box_height(text: str) -> float:
    """Inches of a layer box: its title and the lines of `text` (7.6 pt, spacing 1.25)."""
    return 0.4 + 0.135 * (text.count("\n") + 1)


def draw_layers(out: Path, root: Path = ROOT) -> None:
    """One box per layer, bottom to top, with its modules; cli and server side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    members: dict[str, list[str]] = {layer.key: [] for layer in LAYERS}
    for path in module_files(root):
        members[layer_of(path).key].append(path)
    # The top layer is drawn as two boxes: the server package beside the rest.
    server = [m for m in members["cli"] if m.startswith("dendrite/server/")]
    cli = [m for m in members["cli"] if m not in server]

    width = 11.0
    heights = []
    boxes = []  # per row: (title, text, colour, x, w)
    for layer in LAYERS:
        if layer.key == "cli":
            continue
        text = _listing(members[layer.key], 110)
        if layer.key == "native":
            text = ("dendrite._native (pybind11, typed by _native.pyi): BlockPool  KVTree  "
                    "RadixCache  Scheduler  plan_tree_attention  shared_prefix_pages\n"
                    "built from native/: block_pool  kv_tree  radix_cache  scheduler  "
                    "attention_plan  invariants  bindings")
        boxes.append([(layer.title, text, layer.colour, 0.0, width)])
        heights.append(_box_height(text))
    top = next(layer for layer in LAYERS if layer.key == "cli")
    cli_text, server_text = _listing(cli, 58), _listing(server, 50)
    boxes.append([("cli", cli_text, top.colour, 0.0, width * 0.54 - 0.1),
                  ("server", server_text, top.colour, width * 0.54 + 0.1, width * 0.46 - 0.1)])
    heights.append(max(_box_height(cli_text), _box_height(server_text)))

    gap = 0.22
    total = sum(heights) + gap * (len(heights) - 1)
    fig = plt.figure(figsize=(width + 1.4, total + 0.9), dpi=90)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.2, width + 1.2)
    ax.set_ylim(-0.2, total + 0.7)
    ax.axis("off")
    ax.text(width / 2, total + 0.4, "Dendrite layers: a module imports only from its own "
            "layer or the layers below", ha="center", va="center", fontsize=12, weight="bold")
    y = 0.0
    for row, h in zip(boxes, heights):
        for title, text, colour, x, w in row:
            ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                        fc=colour, ec="#444444", lw=0.8))
            ax.text(x + 0.1, y + h - 0.08, title, ha="left", va="top", fontsize=10.5,
                    weight="bold")
            ax.text(x + 0.1, y + h - 0.3, text, ha="left", va="top", fontsize=7.6,
                    family="monospace", linespacing=1.25)
        y += h + gap
    ax.add_patch(FancyArrowPatch((width + 0.55, total - 0.1), (width + 0.55, 0.1),
                                 arrowstyle="-|>", mutation_scale=18, lw=1.6, color="#555555"))
    ax.text(width + 0.75, total / 2, "imports", rotation=90, ha="center", va="center",
            fontsize=10, color="#555555")
    _save(fig, out)
    plt.close(fig)


#: A step, in order: (title, detail, where it runs). "native": the C++ core on
#: the engine thread; "host": Python on the engine thread; "device": queued on
#: the model's device (CUDA stream, or torch on the CPU).
STEP = (
    ("Scheduler.schedule(leaves, pending)",
     ("native: priority order, token budget max_batch_tokens, chunked prefill;\n"
      "engine: aging (max_wait_steps), _fit_pages: evict prefix cache -> preempt by segment"),
     "native"),
    ("KVTree.append_batch(nodes, counts, tokens)",
     "slot_mapping int32 [T] + copy-on-write rows int32 [m, 3] (src, dst, n); all or nothing",
     "native"),
    ("KVTree.export_csr(nodes) + positions, qo_indptr",
     "kv_indptr / kv_indices / kv_last_page_len: the paged layout FlashInfer reads",
     "native"),
    ("StepPlan (dendrite/model/step.py)",
     "input_ids, positions, slot_mapping, qo_indptr, kv_*, copies, sample_rows, score_rows",
     "host"),
    ("ModelRunner.execute(plan)",
     ("kv_cache.copy_pages(copies), then CUDA-graph replay (decode, every row samples, "
      "nothing scored,\n<= 64 rows: flat / FlashInfer cascade / TreeAttention) or eager: "
      "backend.plan + model "
      "(FlashInfer or torch reference)"),
     "device"),
    ("logits  float32 [N + M, V]",
     "the sample_rows in order, then the score_rows (logprobs of forced / scored tokens)",
     "device"),
    ("Sampler(logits, params, positions, allowed=masks)",
     ("fused Triton kernel on CUDA (mask, temperature, seeded Gumbel noise, argmax)\n"
      "or torch (penalties, top-k/p, min-p; the CPU): tokens, logprobs, top-n"),
     "device"),
    ("tokens to host (cpu_async)",
     "steady decode: step k+1 is launched first (lookahead), fed the ids on the device",
     "host"),
    ("_accept: matcher.consume, StopChecker, max_tokens",
     ("finish_reason: eos / stop / grammar / length; scored (submit_score); abort (cancel or "
      "release);\nerror (this request failed); a request with forced tokens owed waits for "
      "their score_rows"),
     "host"),
    ("GenHandle.result = GenResult(...)",
     "step() returns the finished handles; the rest run again next step",
     "host"),
)

_WHERE = {"native": ("#d9d9d9", "native core (C++, engine thread)"),
          "host": ("#fff2cc", "Python, engine thread"),
          "device": ("#fdd0a2", "queued on the device (CUDA stream; torch on the CPU)")}


def draw_step_flow(out: Path) -> None:
    """The boxes of `STEP` top to bottom, with the grammar masks beside the forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    w, x0 = 7.6, 0.0
    h, gap = 0.64, 0.26
    n = len(STEP)
    total = n * h + (n - 1) * gap
    side_x, side_w = w + 0.5, 3.6
    fig = plt.figure(figsize=(side_x + side_w + 0.4, total + 1.3), dpi=90)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.2, side_x + side_w + 0.2)
    ax.set_ylim(-0.6, total + 0.7)
    ax.axis("off")
    ax.text((side_x + side_w) / 2, total + 0.4, "One engine step (Engine.step)", ha="center",
            va="center", fontsize=13, weight="bold")
    centres = []
    for i, (title, detail, where) in enumerate(STEP):
        y = total - (i + 1) * h - i * gap
        centres.append(y + h / 2)
        ax.add_patch(FancyBboxPatch((x0, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                    fc=_WHERE[where][0], ec="#444444", lw=0.8))
        ax.text(x0 + 0.12, y + h - 0.1, title, ha="left", va="top", fontsize=10,
                weight="bold", family="monospace")
        ax.text(x0 + 0.12, y + h - 0.33, detail, ha="left", va="top", fontsize=7.6,
                linespacing=1.2)
        if i:
            ax.add_patch(FancyArrowPatch((x0 + w / 2, y + h + gap - 0.02), (x0 + w / 2, y + h + 0.02),
                                         arrowstyle="-|>", mutation_scale=12, lw=1.1,
                                         color="#333333"))
    # The grammar masks are filled on the host while the forward runs.
    run_i = [t for t, _, _ in STEP].index("ModelRunner.execute(plan)")
    samp_i = [t for t, _, _ in STEP].index("Sampler(logits, params, positions, allowed=masks)")
    my = (centres[run_i] + centres[samp_i]) / 2
    mh = 1.25
    ax.add_patch(FancyBboxPatch((side_x, my - mh / 2), side_w, mh,
                                boxstyle="round,pad=0.02,rounding_size=0.06",
                                fc="#e5f5e0", ec="#444444", lw=0.8, ls="--"))
    ax.text(side_x + 0.12, my + mh / 2 - 0.1, "grammar masks (MaskWorker)", ha="left", va="top",
            fontsize=10, weight="bold", family="monospace")
    ax.text(side_x + 0.12, my + mh / 2 - 0.38,
            "llguidance fills packed int32\n[N, ceil(V/32)]: bit i % 32 of\nword i // 32 "
            "allows token i.\nWhile the forward runs: on CUDA\nafter the async launch, on the "
            "CPU\non the worker thread (GIL released).", ha="left", va="top", fontsize=7.6,
            linespacing=1.2)
    ax.add_patch(FancyArrowPatch((side_x + side_w / 2, my - mh / 2 - 0.02),
                                 (x0 + w + 0.02, centres[samp_i]), arrowstyle="-|>",
                                 mutation_scale=12, lw=1.1, color="#31a354",
                                 connectionstyle="arc3,rad=-0.25"))
    ax.add_patch(FancyArrowPatch((x0 + w + 0.02, centres[run_i]), (side_x - 0.02, my + mh / 4),
                                 arrowstyle="-|>", mutation_scale=12, lw=1.0, color="#31a354",
                                 ls="--", connectionstyle="arc3,rad=-0.2"))
    ax.legend(handles=[Patch(fc=c, ec="#444444", label=label) for c, label in _WHERE.values()],
              loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    _save(fig, out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="print the module tables and exit")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if design.md's module tables differ from the tree")
    args = ap.parse_args(argv)
    if args.table:
        for key, table in tables().items():
            print(f"<!-- modules:{key} -->\n{table}\n<!-- /modules -->\n")
        return 0
    text = DOC.read_text(encoding="utf-8")
    fresh = render_doc(text)
    if args.check:
        if fresh != text:
            print("docs/design.md: module tables are stale; run python docs/draw_design.py",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        DOC.write_text(fresh, encoding="utf-8")
    draw_layers(ROOT / "docs" / "layers.png")
    draw_step_flow(ROOT / "docs" / "step_flow.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's modules form layers in a line, with no import circle.

Every ``import`` in dendrite/ is read with `ast`: at module level, inside
functions (lazy) and under ``if TYPE_CHECKING:`` (type-only). Each counts:
a lazy import is still a dependency, only deferred. The layers, lowest first:

    native -> kv -> model/kernels/attention -> sampling/grammar -> engine
           -> program -> search -> dsl -> cli (server beside it)

A module may import its own layer or lower ones, never a higher one, and the
module graph has no cycle. Also: the engine takes nothing from `dendrite.model`
but `ModelRunner`/`StepPlan`, and no module but `dendrite.kernels.config` reads
a ``DENDRITE_*`` variable (DENDRITE_MODEL in the engine and DENDRITE_CACHE in
the default-model cache are the documented exceptions).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dendrite"

#: Layer of each module, lowest first: the longest listed prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("native", ("dendrite._native",)),
    ("kv", ("dendrite.kv",)),
    ("model/kernels/attention", ("dendrite.model", "dendrite.kernels", "dendrite.attention",
                                 "dendrite.quant",
                                 "dendrite.transfer", "dendrite.default_model",
                                 "dendrite.tiny_model", "dendrite.parallel")),
    ("sampling/grammar", ("dendrite.sampling", "dendrite.grammar", "dendrite.stopping")),
    ("engine", ("dendrite.engine", "dendrite.speculative")),
    # (replicas run programs over engine processes; the rest of dendrite.parallel
    # is model level)
    ("program", ("dendrite.program", "dendrite.tree_view", "dendrite.parallel.replicas")),
    ("search", ("dendrite.search",)),
    ("dsl", ("dendrite.dsl",)),
    # the top: the command line, the HTTP server, and the package facade whose
    # names all load lazily
    ("cli/server", ("dendrite.cli", "dendrite.cli_common", "dendrite.cli_run", "dendrite.demo",
                    "dendrite.server", "dendrite")),
]

#: DENDRITE_* variables read outside kernels/config.py, and where (kernels/config.py
#: documents them: they are not tuning choices).
ENV_EXCEPTIONS = {"DENDRITE_MODEL": "dendrite.engine", "DENDRITE_CACHE": "dendrite.default_model"}
ENV_OWNER = "dendrite.kernels.config"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    path: Path
    line: int
    kind: str  # "eager", "lazy" (inside a function) or "type-only"

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT)
        return f"{where}:{self.line}: {self.src} -> {self.dst} ({self.kind})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a .pyi stands for a compiled one)."""
    found = {_module_name(p): p for p in PKG.rglob("*.pyi")}
    found.update({_module_name(p): p for p in PKG.rglob("*.py")})
    return found


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module `name` loads: itself, or its nearest enclosing package."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(mods: dict[str, Path] | None = None) -> list[Edge]:
    """Every import between two modules of the package, with file:line and kind."""
    mods = modules() if mods is None else mods
    out: list[Edge] = []
    for src, path in mods.items():
        if path.suffix == ".pyi":
            continue
        is_pkg = path.name == "__init__.py"

        def add(target: str, node: ast.stmt, kind: str) -> None:
            dst = _resolve(target, mods)
            if dst is not None and dst != src:
                out.append(Edge(src, dst, path, node.lineno, kind))

        def visit(node: ast.AST, kind: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, "lazy" if kind == "eager" else kind)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for stmt in child.body:
                        visit_stmt(stmt, "type-only")
                    for stmt in child.orelse:
                        visit_stmt(stmt, kind)
                else:
                    visit_stmt(child, kind)

        def visit_stmt(child: ast.AST, kind: str) -> None:
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, kind)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = src.split(".") if is_pkg else src.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    # `from pkg import sub` loads pkg.sub when that is a module
                    full = f"{module}.{alias.name}"
                    add(full if full in mods else module, child, kind)
            else:
                visit(child, kind)

        visit(ast.parse(path.read_text(), str(path)), "eager")
    return out


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package stands for its own __init__ only
            if module == prefix or (prefix != "dendrite" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def find_cycle(graph: dict[str, list[Edge]]) -> list[Edge] | None:
    """One import cycle as its edges, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        trail: list[Edge] = []
        state[start] = 1
        while stack:
            node, i = stack[-1]
            out = graph.get(node, [])
            if i == len(out):
                state[node] = 2
                stack.pop()
                if trail:
                    trail.pop()
                continue
            stack[-1] = (node, i + 1)
            e = out[i]
            if state.get(e.dst) == 1:
                first = next(k for k, t in enumerate(trail) if t.src == e.dst) \
                    if any(t.src == e.dst for t in trail) else len(trail)
                return trail[first:] + [e]
            if not state.get(e.dst):
                state[e.dst] = 1
                trail.append(e)
                stack.append((e.dst, 0))
    return None


def _graph(es: list[Edge]) -> dict[str, list[Edge]]:
    g: dict[str, list[Edge]] = {}
    for e in es:
        g.setdefault(e.src, []).append(e)
    return g


# -- the checks themselves work ------------------------------------------------------


def test_the_parser_sees_lazy_type_only_and_relative_imports(tmp_path):
    pkg = tmp_path / "dendrite"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "import dendrite.b\n"
                              "if TYPE_CHECKING:\n    from dendrite.sub import c\n"
                              "def f():\n    from dendrite import b\n")
    (pkg / "b.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\nfrom .c import x\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    mods = {_module_name_in(tmp_path, p): p for p in pkg.rglob("*.py")}
    got = {(e.src, e.dst, e.line, e.kind) for e in edges_in(tmp_path, mods)}
    assert got == {
        ("dendrite.a", "dendrite.b", 2, "eager"),
        ("dendrite.a", "dendrite.sub.c", 4, "type-only"),
        ("dendrite.a", "dendrite.b", 6, "lazy"),
        ("dendrite.sub", "dendrite.sub.c", 1, "eager"),
        ("dendrite.sub", "dendrite.sub.c", 2, "eager"),
        ("dendrite.sub.c", "dendrite.a", 1, "eager"),
    }


def _module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges_in(root: Path, mods: dict[str, Path]) -> list[Edge]:
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return edges(mods)
    finally:
        ROOT = saved


def test_find_cycle_reports_the_loop():
    p = Path(__file__)
    es = [Edge("a", "b", p, 1, "eager"), Edge("b", "c", p, 2, "lazy"),
          Edge("c", "a", p, 3, "type-only"), Edge("c", "d", p, 4, "eager")]
    cycle = find_cycle(_graph(es))
    assert cycle is not None and {e.src for e in cycle} == {"a", "b", "c"}
    assert find_cycle(_graph(es[:2] + es[3:])) is None


# -- the package ------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_edges() -> list[Edge]:
    return edges()


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"modules with no layer (add them to LAYERS in {__file__}): {missing}"


def test_no_import_cycle(all_edges):
    cycle = find_cycle(_graph(all_edges))
    assert cycle is None, "import cycle:\n  " + "\n  ".join(map(str, cycle or []))


def test_no_layer_imports_a_higher_one(all_edges):
    bad = []
    for e in all_edges:
        lo, hi = layer_of(e.src), layer_of(e.dst)
        if lo is not None and hi is not None and hi > lo:
            bad.append(f"{e}: layer {LAYERS[lo][0]!r} imports layer {LAYERS[hi][0]!r}")
    assert not bad, "imports against the layer order:\n  " + "\n  ".join(dict.fromkeys(bad))


def test_engine_imports_only_the_runner_from_the_model_package(all_edges):
    from_model = set()
    for e in all_edges:
        if e.src == "dendrite.engine" and layer_of(e.dst) == 2:
            tree = ast.parse(e.path.read_text())
            node = next(n for n in ast.walk(tree)
                        if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno == e.line)
            names = [a.name for a in node.names]
            from_model |= {(e.dst, n) for n in names}
    allowed = {("dendrite.model.runner", "ModelRunner"), ("dendrite.model.runner", "StepPlan"),
               # the default model is fetched by name when no model dir is given
               ("dendrite.default_model", "default_model_dir"),
               ("dendrite.kernels.config", "KernelConfig"),
               # tensor parallel: the runner of rank 0, built with its processes
               ("dendrite.parallel", "start_tensor_parallel")}
    extra = sorted(from_model - allowed)
    assert not extra, f"dendrite/engine.py imports model-side internals: {extra}"


_ENV_NAME = re.compile(r"DENDRITE_[A-Z0-9_]+")


def test_only_the_kernel_config_reads_dendrite_variables():
    bad = []
    for name, path in modules().items():
        if name == ENV_OWNER or path.suffix == ".pyi":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _ENV_NAME.fullmatch(node.value) \
                    and ENV_EXCEPTIONS.get(node.value) != name:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not bad, (f"DENDRITE_* variables named outside {ENV_OWNER} (and the documented "
                     f"exceptions {ENV_EXCEPTIONS}):\n  " + "\n  ".join(bad))

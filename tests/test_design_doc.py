"""docs/design.md against the code: its module tables cover the package, its
quoted defaults and constants are the code's, every finish reason the engine
sets is explained, and what it links to exists.

Everything is read from the tree (files walked, code parsed, signatures
inspected), so moving or adding a module needs only the doc regenerated
(`python docs/draw_design.py`), never this test edited.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "design.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

#: A row of a module table: | `dendrite/...py` | job |
_MODULE_ROW = re.compile(r"^\| `(dendrite/[^`]+\.pyi?)` \|", re.MULTILINE)
_NATIVE_ROW = re.compile(r"^\| `(native/[^`]+)` \|", re.MULTILINE)


def _block(kind: str, arg: str | None = None) -> str:
    """The text between `<!-- kind[:arg] -->` and `<!-- /kind -->`."""
    head = f"<!-- {kind}:{arg} -->" if arg else f"<!-- {kind} -->"
    m = re.search(re.escape(head) + r"\n(.*?)<!-- /" + kind + " -->", DOC, re.DOTALL)
    assert m, f"docs/design.md has no {head} block"
    return m.group(1)


def _rows(block: str) -> dict[str, str]:
    """First column -> second column of the table rows `| `a` | `b` | ... |`."""
    return dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", block, re.MULTILINE))


def _package_modules() -> set[str]:
    """Every module file under dendrite/ (the native module by its .pyi stub)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "dendrite").rglob("*")
            if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts}


def test_module_tables_list_every_module_once_and_only_real_ones():
    named = _MODULE_ROW.findall(DOC)
    dupes = sorted({m for m in named if named.count(m) > 1})
    assert not dupes, f"modules listed more than once in design.md: {dupes}"
    on_disk = _package_modules()
    missing = sorted(on_disk - set(named))
    assert not missing, (f"modules missing from design.md's tables (run python "
                         f"docs/draw_design.py): {missing}")
    stale = sorted(set(named) - on_disk)
    assert not stale, f"design.md lists modules that do not exist: {stale}"


def test_native_table_lists_the_core_headers_and_bindings():
    named = set(_NATIVE_ROW.findall(DOC))
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "native").glob("*.h")}
    on_disk.add("native/bindings.cpp")
    assert named == on_disk, (f"native table: missing {sorted(on_disk - named)}, "
                              f"stale {sorted(named - on_disk)}")


def _draw_design():
    """docs/draw_design.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("draw_design", ROOT / "docs" / "draw_design.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("draw_design", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["draw_design"])
    return sys.modules["draw_design"]


def _imported_modules(path: str) -> set[str]:
    """Dotted `dendrite...` names `path` imports anywhere (lazy imports and
    TYPE_CHECKING blocks included), relative imports resolved."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    dotted = path.removesuffix(".py").replace("/", ".")
    package = dotted.removesuffix(".__init__") if path.endswith("__init__.py") \
        else dotted.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in out if name == "dendrite" or name.startswith("dendrite.")}


def test_layer_picture_is_true_every_import_points_down():
    dd = _draw_design()
    order = {layer.key: i for i, layer in enumerate(dd.LAYERS)}
    files = dd.module_files()
    by_name = {f.removesuffix(".pyi").removesuffix(".py").replace("/", ".")
               .removesuffix(".__init__"): f for f in files}

    def owner(name: str) -> str | None:
        while name and name not in by_name:
            name = name.rpartition(".")[0]
        return by_name.get(name)

    upward = []
    for f in files:
        if not f.endswith(".py"):
            continue
        low = order[dd.layer_of(f).key]
        for name in _imported_modules(f):
            g = owner(name)
            if g is not None and g != f and order[dd.layer_of(g).key] > low:
                upward.append(f"{f} -> {g}")
    assert not upward, f"imports against the layer order of docs/layers.png: {upward}"


def _code_defaults(obj: object) -> dict[str, object]:
    """Defaulted arguments of a class's constructor (dataclass fields included)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj)
                if f.init and f.default is not dataclasses.MISSING}
    sig = inspect.signature(obj.__init__)
    return {name: p.default for name, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("target", ["dendrite.engine.Engine", "dendrite.sampling.SamplingParams"])
def test_quoted_defaults_are_the_code_defaults(target):
    module, name = target.rsplit(".", 1)
    code = _code_defaults(getattr(importlib.import_module(module), name))
    quoted = {k: ast.literal_eval(v) for k, v in _rows(_block("defaults", target)).items()}
    assert set(quoted) == set(code), (f"{target}: arguments with defaults {sorted(code)}, "
                                      f"design.md quotes {sorted(quoted)}")
    wrong = {k: (quoted[k], code[k]) for k in code
             if quoted[k] != code[k] or type(quoted[k]) is not type(code[k])}
    assert not wrong, f"{target}: design.md default != code default: {wrong}"


def test_engine_max_batch_tokens_is_quoted_in_the_api_sketch():
    # The signature sketch above the table must not drift from it either.
    default = inspect.signature(
        importlib.import_module("dendrite.engine").Engine.__init__
    ).parameters["max_batch_tokens"].default
    sketch = re.search(r"engine = Engine\((.*?)\)\n", DOC, re.DOTALL).group(1)
    assert f"max_batch_tokens={default}" in sketch


def test_quoted_constants_are_the_code_values():
    rows = _rows(_block("constants"))
    assert rows, "the constants table is empty"
    for path, text in rows.items():
        module, name = path.rsplit(".", 1)
        value = getattr(importlib.import_module(module), name)
        assert ast.literal_eval(text) == value, f"{path}: design.md says {text}, code has {value!r}"


def _engine_finish_reasons() -> set[str]:
    """String reasons the engine finishes requests with: the literals passed as
    `reason` to its methods that take one (`_finish` and any helper in front of
    it), and the literals `StopChecker.check` returns (passed on as `reason`)."""
    engine = ast.parse((ROOT / "dendrite" / "engine.py").read_text(encoding="utf-8"))
    takes_reason = {}  # method name -> index of `reason` among the call's arguments
    for node in ast.walk(engine):
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in node.args.args]
            if "reason" in names:
                offset = 1 if names[0] == "self" else 0  # calls go through self.
                takes_reason[node.name] = names.index("reason") - offset
    assert "_finish" in takes_reason, "Engine._finish(h, reason, ...) not found"
    reasons = set()
    for node in ast.walk(engine):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in takes_reason):
            continue
        i = takes_reason[node.func.attr]
        args = node.args[i:i + 1] + [k.value for k in node.keywords if k.arg == "reason"]
        reasons |= {a.value for a in args if isinstance(a, ast.Constant)
                    and isinstance(a.value, str)}
    stopping = ast.parse((ROOT / "dendrite" / "stopping.py").read_text(encoding="utf-8"))
    check = next(n for n in ast.walk(stopping)
                 if isinstance(n, ast.FunctionDef) and n.name == "check")
    for node in ast.walk(check):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            reasons.add(node.value.value)
    return reasons


def test_every_finish_reason_of_the_engine_is_in_the_doc():
    reasons = _engine_finish_reasons()
    # Guards the parse above: these are known to exist.
    assert {"eos", "stop", "length", "grammar", "abort", "error"} <= reasons
    section = DOC.split("## Finish reasons", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r'^\| `"(\w+)"` \|', section, re.MULTILINE))
    assert documented == reasons, (f"finish reasons in the code {sorted(reasons)}, "
                                   f"in design.md {sorted(documented)}")


def test_every_dendrite_environment_variable_is_in_the_doc():
    names = set()
    for p in (ROOT / "dendrite").rglob("*.py"):
        names |= set(re.findall(r"\bDENDRITE_[A-Z][A-Z0-9_]*", p.read_text(encoding="utf-8")))
    assert "DENDRITE_MODEL" in names  # the scan works
    missing = sorted(n for n in names if f"`{n}`" not in DOC)
    assert not missing, f"environment variables missing from design.md: {missing}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of `markdown` (lowercase, punctuation
    dropped, spaces to dashes); headings inside code blocks do not count."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_pictures_and_links_exist_and_pictures_are_small():
    links = re.findall(r"\]\(([^)\s]+)\)", DOC)
    targets = [link.partition("#")[0] for link in links]
    assert "layers.png" in targets and "step_flow.png" in targets
    for link in links:
        if "://" in link:
            continue
        target, _, anchor = link.partition("#")
        path = DOC_PATH.parent / target if target else DOC_PATH
        assert path.exists(), f"design.md links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path.read_text(encoding="utf-8")), \
                f"design.md links to {link}: {path.name} has no heading with that anchor"
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
            assert path.stat().st_size < 200_000, f"{target} is {path.stat().st_size} bytes"


def test_no_eager_cascade_backend_and_masks_are_packed_words():
    # Two of the five errors issue 14 found in the old page.
    assert "CascadeBackend" not in DOC
    assert "packed" in DOC and "ceil(V/32)" in DOC

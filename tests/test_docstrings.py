"""Every public name of the package has a docstring.

Public: a module whose dotted path has no part starting with ``_``; in it, the
classes and functions of ``__all__`` when it has one, else those not starting
with ``_``; and every method (property included) of a public class whose name
does not start with ``_``. Read with `ast`, so no optional dependency (CUDA,
flashinfer, fastapi) has to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dendrite"

_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _public_modules() -> list[Path]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if not any(p.startswith("_") and p != "__init__" for p in parts):
            out.append(path)
    return out


def _all_names(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return {str(v) for v in ast.literal_eval(node.value)}
            except ValueError:  # built from other names: fall back to the `_` rule
                return None
    return None


def _is_setter(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@x.setter``/``@x.deleter``: documented by the property itself."""
    return any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter")
               for d in fn.decorator_list)


def missing_docstrings(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: name`` of each public class/function/method without a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(root)
    exported = _all_names(tree)
    missing = []
    if ast.get_docstring(tree) is None:
        missing.append(f"{where}:1: (module)")
    for node in tree.body:
        if not isinstance(node, _DEFS):
            continue
        public = node.name in exported if exported is not None else not node.name.startswith("_")
        if not public:
            continue
        if ast.get_docstring(node) is None:
            missing.append(f"{where}:{node.lineno}: {node.name}")
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, _DEFS[1:]) and not item.name.startswith("_") \
                        and ast.get_docstring(item) is None and not _is_setter(item):
                    missing.append(f"{where}:{item.lineno}: {node.name}.{item.name}")
    return missing


def test_the_check_sees_what_is_missing(tmp_path):
    src = ('"""m"""\n__all__ = ["f", "C"]\n'
           'def f():\n    pass\n'
           'def g():\n    pass\n'
           'class C:\n    """c"""\n    def m(self):\n        pass\n'
           '    def _p(self):\n        pass\n    @property\n    def q(self):\n        """q"""\n'
           '    @q.setter\n    def q(self, v):\n        pass\n')
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    assert missing_docstrings(probe, tmp_path) == ["probe.py:3: f", "probe.py:9: C.m"]
    probe.write_text("def h():\n    pass\n")  # no __all__: the `_` rule; no module docstring
    assert missing_docstrings(probe, tmp_path) == ["probe.py:1: (module)", "probe.py:1: h"]


def test_every_public_name_has_a_docstring():
    missing = [m for path in _public_modules() for m in missing_docstrings(path)]
    assert not missing, f"{len(missing)} public names without a docstring:\n  " + "\n  ".join(missing)

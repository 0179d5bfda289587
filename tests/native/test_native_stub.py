"""dendrite/_native.pyi matches the built module, so the stub cannot rot.

The stub is parsed with `ast` and compared with what the module says about
itself: the public names (and vice versa), each class's methods and
properties (settable or not), exception bases, and for every function and
overload its argument names, which have defaults and their values, and its
docstring, all read from pybind11's signature lines. The docstrings are
compared word for word (whitespace aside): the bindings are the reference.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dendrite
from dendrite import _native, kv

STUB = Path(dendrite.__file__).with_name("_native.pyi")
# Dunders that are part of the API; pybind11 adds others (__module__, ...).
API_DUNDERS = {"__init__", "__iter__", "__len__", "__contains__", "__repr__"}


@dataclass
class Func:
    """One callable: the (args, defaults) of each overload and their docstrings."""
    overloads: list[tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)


def _norm(doc: str | None) -> str:
    return " ".join((doc or "").split())


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name in API_DUNDERS


# -- the stub -----------------------------------------------------------------------------


def _stub_func(defs: list[ast.FunctionDef]) -> Func:
    f = Func()
    for d in defs:
        a = d.args
        args = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]
        positional = [x.arg for x in a.posonlyargs + a.args]
        defaults = {positional[len(positional) - len(a.defaults) + i]: ast.unparse(v)
                    for i, v in enumerate(a.defaults)}
        defaults |= {x.arg: ast.unparse(v) for x, v in zip(a.kwonlyargs, a.kw_defaults)
                     if v is not None}
        f.overloads.append((tuple(args), defaults))
        f.docs.append(_norm(ast.get_docstring(d, clean=True)))
    return f


def _decorators(d: ast.FunctionDef) -> set[str]:
    return {ast.unparse(x) for x in d.decorator_list}


def _stub_class(node: ast.ClassDef) -> dict:
    funcs: dict[str, list[ast.FunctionDef]] = {}
    props: dict[str, dict] = {}
    for d in node.body:
        if not isinstance(d, ast.FunctionDef):
            continue
        deco = _decorators(d)
        if "property" in deco:
            props[d.name] = {"doc": _norm(ast.get_docstring(d)), "settable": False}
        elif f"{d.name}.setter" in deco:
            props[d.name]["settable"] = True
        else:
            funcs.setdefault(d.name, []).append(d)
    return {"bases": [ast.unparse(b) for b in node.bases], "doc": _norm(ast.get_docstring(node)),
            "props": props, "funcs": {k: _stub_func(v) for k, v in funcs.items()}}


def _parse_stub(text: str) -> dict:
    tree = ast.parse(text, filename=str(STUB))
    out: dict = {"doc": _norm(ast.get_docstring(tree)), "classes": {}, "funcs": {}, "other": set()}
    funcs: dict[str, list[ast.FunctionDef]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out["classes"][node.name] = _stub_class(node)
        elif isinstance(node, ast.FunctionDef):
            funcs.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out["other"] |= {ast.unparse(t) for t in targets}
    out["funcs"] = {k: _stub_func(v) for k, v in funcs.items()}
    return out


# -- the module (pybind11 signature lines) -------------------------------------------------


def _split_top_level(s: str) -> list[str]:
    """`s` split at commas outside brackets (types like tuple[int, int] hold commas)."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def _native_func(name: str, obj: object) -> Func:
    """Overloads of a pybind11 function from its docstring: `name(a: T, b: T = d) -> R`
    lines (numbered `1. ` when overloaded), each followed by its own docstring."""
    doc = obj.__doc__ or ""
    sig = re.compile(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> .*$")
    f = Func()
    text: list[str] = []
    for line in doc.splitlines():
        m = sig.match(line)
        if m:
            if f.overloads:
                f.docs.append(_norm("\n".join(text)))
            text = []
            args, defaults = [], {}
            for part in _split_top_level(m.group(1)):
                arg, _, default = part.partition(" = ")
                arg = arg.split(":")[0].strip()
                if arg == "self":
                    continue
                args.append(arg)
                if default:
                    defaults[arg] = default
            f.overloads.append((tuple(args), defaults))
        elif f.overloads:
            text.append(line)
    assert f.overloads, f"no pybind11 signature line in the docstring of {name}"
    f.docs.append(_norm("\n".join(text)))
    return f


def _native_class(cls: type) -> dict:
    props, funcs = {}, {}
    for name, v in vars(cls).items():
        if not _is_public(name):
            continue
        if isinstance(v, property):
            props[name] = {"doc": _norm(v.__doc__), "settable": v.fset is not None}
        elif type(v).__name__ == "instancemethod":  # pybind11's method wrapper
            funcs[name] = _native_func(name, v)
    return {"props": props, "funcs": funcs}


NATIVE_NAMES = sorted(n for n in dir(_native) if not n.startswith("_"))


def _func_mismatches(where: str, native: Func, stub: Func | None) -> list[str]:
    if stub is None:
        return [f"{where}: missing from the stub"]
    if sorted(stub.overloads, key=repr) != sorted(native.overloads, key=repr):
        return [f"{where}: arguments differ: stub {stub.overloads}, module {native.overloads}"]
    out = []
    for sig, doc in zip(native.overloads, native.docs):
        stub_doc = stub.docs[stub.overloads.index(sig)]
        if stub_doc != doc:
            out.append(f"{where}{sig}: docstring differs\n  stub:   {stub_doc}\n  module: {doc}")
    return out


def _class_mismatches(name: str, cls: type, stub: dict | None) -> list[str]:
    if stub is None:
        return [f"{name}: class missing from the stub"]
    out = [] if _norm(cls.__doc__) == stub["doc"] else [f"{name}: class docstring differs"]
    if issubclass(cls, BaseException):
        if stub["bases"] != [b.__name__ for b in cls.__bases__]:
            out.append(f"{name}: bases differ")
        return out
    native = _native_class(cls)
    for p in sorted({*native["props"], *stub["props"]}):
        if native["props"].get(p) != stub["props"].get(p):
            out.append(f"{name}.{p}: property differs (missing, docstring or setter): "
                       f"stub {stub['props'].get(p)}, module {native['props'].get(p)}")
    out += [f"{name}.{m}: not in the module" for m in stub["funcs"] if m not in native["funcs"]]
    for m, f in native["funcs"].items():
        out += _func_mismatches(f"{name}.{m}", f, stub["funcs"].get(m))
    return out


def _mismatches(stub: dict) -> list[str]:
    """Every way `stub` (a parsed .pyi) disagrees with the built module."""
    stub_names = sorted(n for n in [*stub["classes"], *stub["funcs"], *stub["other"]]
                        if not n.startswith("_"))
    out = [f"{n}: in the stub, not in the module" for n in stub_names if n not in NATIVE_NAMES]
    if _norm(_native.__doc__) != stub["doc"]:
        out.append("module docstring differs")
    for n in NATIVE_NAMES:
        obj = getattr(_native, n)
        if isinstance(obj, type):
            out += _class_mismatches(n, obj, stub["classes"].get(n))
        else:
            out += _func_mismatches(n, _native_func(n, obj), stub["funcs"].get(n))
    return out


# -- tests -------------------------------------------------------------------------------------


def test_stub_matches_the_module():
    assert _mismatches(_parse_stub(STUB.read_text())) == []


@pytest.mark.parametrize("old, new", [
    # a method lost
    ('    def fork_one(self, node: SupportsIndex) -> int:\n'
     '        """`fork(node, 1)[0]` without building a list."""\n', ""),
    # an argument renamed, a default changed, a docstring edited on one side only
    ("def evict(self, num_pages:", "def evict(self, n:"),
    ("cow_headroom: SupportsIndex = 0", "cow_headroom: SupportsIndex = 1"),
    ("Pages with a nonzero refcount.", "Pages in use."),
    # a setter dropped, an overload dropped, a name the module lacks
    ("    @token_budget.setter\n", "    @staticmethod\n"),
    ("    @overload\n    def unpin(self, last_page: SupportsIndex) -> None:\n"
     '        """Unpin a match by its last page id."""\n', ""),
    ("def bench_fork_ns(", "def bench_fork_us(tree: KVTree) -> float: ...\ndef bench_fork_ns("),
])
def test_a_rotten_stub_is_caught(old, new):
    text = STUB.read_text()
    assert old in text
    assert _mismatches(_parse_stub(text.replace(old, new, 1))) != []


def test_every_public_name_has_a_docstring():
    missing = [n for n in NATIVE_NAMES if not _norm(getattr(_native, n).__doc__)]
    for n in NATIVE_NAMES:
        cls = getattr(_native, n)
        if isinstance(cls, type) and not issubclass(cls, BaseException):
            info = _native_class(cls)
            missing += [f"{n}.{p}" for p, v in info["props"].items() if not v["doc"]]
            missing += [f"{n}.{m}" for m, f in info["funcs"].items()
                        if not m.startswith("__") and not all(f.docs)]
    assert not missing


def test_kv_reexports_the_native_objects():
    for name in ["AppendResult", "ArgumentRangeError", "BlockPool", "FrozenNode", "KVTree",
                 "OutOfPages", "RadixCache", "Scheduler"]:
        assert getattr(kv, name) is getattr(_native, name), name
    assert set(kv.__all__) == {*[n for n in NATIVE_NAMES if n[0].isupper()], "InvariantError",
                               "check_invariants"}


def test_the_package_is_marked_typed():
    # scikit-build-core puts the whole dendrite/ directory in the wheel.
    assert STUB.is_file() and STUB.with_name("py.typed").is_file()

"""The ``.dendrite`` script language.

    program best_of(question, n=4):
        "Question: {question}\\nAnswer:"
        fork n as answer:
            gen text_answer(max_tokens=32, stop="\\n", temperature=0.8)
        select answer by logprob
        return text_answer

`load(path)` (also `load_script`, as ``dendrite.load_script``) / `loads(source)` compile a script to the same
`dendrite.program.Program` objects the ``@program`` decorator makes; errors are
`ScriptError`s with ``file:line:col`` and a caret. The grammar is
``dendrite/dsl/dendrite.lark``; standard scripts live in ``dendrite/dsl/programs/``
(shipped as package data).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ScriptError, ScriptNameError, ScriptRuntimeError, ScriptSyntaxError
from .strings import split_string

PROGRAMS_DIR = Path(__file__).with_name("programs")
GRAMMAR = Path(__file__).with_name("dendrite.lark")


def parse(source: str, filename: str = "<script>"):
    """The lark parse tree of a script (raises `ScriptSyntaxError`)."""
    from .parser import parse as _parse

    return _parse(source, filename)


def loads_all(source: str, filename: str = "<script>") -> dict:
    """Compile every program of a script: ``{name: Program}`` in file order."""
    from .compiler import Compiler

    tree = parse(source, filename)
    return Compiler(source, filename).compile_module(tree)


def loads(source: str, filename: str = "<script>", name: str | None = None):
    """Compile a script and return its first program (or the one called ``name``)."""
    programs = loads_all(source, filename)
    if name is None:
        return next(iter(programs.values()))
    if name not in programs:
        raise KeyError(f"{filename} has no program {name!r} (it has: {', '.join(programs)})")
    return programs[name]


def load(path: str | Path, name: str | None = None):
    """Compile a ``.dendrite`` file; errors name the file as given."""
    p = Path(path)
    return loads(p.read_text(), filename=str(path), name=name)


#: ``dendrite.load_script(path)``: the name the top-level package exports.
load_script = load


def standard_script(name: str) -> Path:
    """Path of a shipped script: ``standard_script("tot")`` -> dendrite/dsl/programs/tot.dendrite."""
    p = PROGRAMS_DIR / (name if name.endswith(".dendrite") else name + ".dendrite")
    if not p.exists():
        have = ", ".join(sorted(x.stem for x in PROGRAMS_DIR.glob("*.dendrite")))
        raise FileNotFoundError(f"no standard script {name!r} (have: {have})")
    return p


__all__ = [
    "GRAMMAR",
    "PROGRAMS_DIR",
    "ScriptError",
    "ScriptNameError",
    "ScriptRuntimeError",
    "ScriptSyntaxError",
    "load",
    "load_script",
    "loads",
    "loads_all",
    "parse",
    "split_string",
    "standard_script",
]

"""Every Python example of docs/programs.md runs, top to bottom, as a reader runs it.

The blocks run in order in one namespace (a later block may use a name an
earlier one imported). `engine` is the tiny model's engine, and
`dendrite.Engine()` (the built-in model) resolves to the tiny model through
DENDRITE_MODEL, so the examples run in seconds. Each block that defines a
program is also called, so a block that only defines one still runs. The
sections' own tests check what each example returns; this one makes sure no
example of the page is left untested or stale.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "programs.md"


def python_blocks() -> list[tuple[int, str]]:
    text = DOC.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_page_has_python_examples():
    assert len(python_blocks()) >= 4


def test_every_python_example_runs(make_engine, tiny_model_dir, monkeypatch, capsys):
    from dendrite.program.program import Program

    monkeypatch.setenv("DENDRITE_MODEL", str(tiny_model_dir))
    ns: dict = {"engine": make_engine()}
    for line, code in python_blocks():
        before = {k: v for k, v in ns.items() if isinstance(v, Program)}
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), ns)  # noqa: S102 - the doc, as written
        new = [v for k, v in ns.items() if isinstance(v, Program) and before.get(k) is not v]
        for prog in new:
            if "result" in code:
                continue  # the block runs its program itself
            params = [p for p in inspect.signature(prog.fn).parameters.values()][1:]
            if any(p.default is inspect.Parameter.empty for p in params):
                continue  # needs arguments only the block's prose gives
            result = prog.run(ns["engine"], seed=0)
            assert result.value is not None, f"programs.md:{line}: {prog.fn.__name__} returned None"
    out = capsys.readouterr().out
    assert out.strip(), "the examples print their results"

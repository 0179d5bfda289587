"""docs/programs.md: its script compiles and its error example is what the compiler prints."""

from __future__ import annotations

from pathlib import Path

import dendrite.dsl as dsl

DOC = Path(__file__).resolve().parents[2] / "docs" / "programs.md"


def _fenced(info: str) -> list[str]:
    blocks, cur, tag = [], None, None
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, tag = [], line[3:].strip()
            else:
                if tag == info:
                    blocks.append("\n".join(cur) + "\n")
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def test_doc_script_compiles_and_error_example_is_exact():
    script, error = [b for b in _fenced("") if b.startswith("# Tree")][0], _fenced("")[-1]
    prog = dsl.loads(script, "tot.dendrite")
    assert prog.name == "tot"
    bad = script.replace("temperature=0.8)", "temprature=0.8)")
    try:
        dsl.loads(bad, "tot.dendrite")
    except dsl.ScriptError as e:
        assert str(e) + "\n" == error
    else:  # pragma: no cover
        raise AssertionError("no error")

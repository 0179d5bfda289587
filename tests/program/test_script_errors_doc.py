"""docs/errors.md, "Scripts and programs": each example script prints exactly the
error shown under it, run the way `dendrite run` runs it on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def _examples() -> list[tuple[str, str]]:
    """(script, error) pairs: each ```dendrite block and the ```text block after it."""
    text = DOC.read_text()
    section = text.split("\n## Scripts and programs\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", section, re.M | re.S)
    pairs = []
    for (kind, body), (next_kind, next_body) in zip(blocks, blocks[1:]):
        if kind == "dendrite":
            assert next_kind == "text", "an example script is followed by its error"
            pairs.append((body, next_body))
    return pairs


EXAMPLES = _examples()


def test_the_section_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script, error", EXAMPLES, ids=[e.split(":")[3][:30] for _, e in EXAMPLES])
def test_example_prints_the_documented_error(dsl, engine, tmp_path, script, error):
    path = tmp_path / "t.dendrite"
    path.write_text(script)
    m = re.search(r"--max-steps (\d+)", script)
    max_steps = int(m.group(1)) if m else None
    with pytest.raises(dsl.ScriptError) as ei:
        prog = dsl.load(path)
        prog.run(engine, seed=0, max_steps=max_steps, q="What is 2+3?")
    # the doc shows the file as "t.dendrite"
    assert str(ei.value).replace(str(path), "t.dendrite") + "\n" == error

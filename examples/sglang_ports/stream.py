"""Port of SGLang's stream program: the answer's text arrives in deltas while it is
generated."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program


@program
def story(s, topic: str):
    s += f"Write one sentence about {topic}.\nSentence:" + gen("sentence", max_tokens=24, stop="\n")
    return s["sentence"]


def main(engine: Any) -> tuple[str, list[str]]:
    """The capture and the deltas streamed for it, in order."""
    deltas: list[str] = []

    def on_text(state: Any, name: str | None, delta: str) -> None:
        if name == "sentence":
            deltas.append(delta)

    value = story.run(engine, topic="the moon", temperature=0, seed=0, on_text=on_text).value
    return value, deltas

"""Port of SGLang's select program: the model ranks fixed answers by logprob."""

from __future__ import annotations

from typing import Any

from dendrite.program import program, select

CHOICES = ["true", "false", "unknown"]


@program
def decide(s, statement: str):
    s += f"Is the following statement true, false or unknown?\n{statement}\nAnswer: "
    s += select("answer", choices=CHOICES)
    return s["answer"]


def main(engine: Any) -> str:
    return decide.run(engine, statement="The capital of France is Paris.", seed=0).value

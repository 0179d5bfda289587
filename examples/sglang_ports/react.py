"""Port of SGLang's ReAct program: Thought / Action / Observation steps, the action chosen
among fixed ones."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program, select

ACTIONS = ["Search", "Lookup", "Finish"]


@program
def react(s, question: str, steps: int = 2):
    s += ("Answer the question with interleaved Thought, Action, Observation steps.\n"
          f"Question: {question}\n")
    for i in range(1, steps + 1):
        s += f"Thought {i}:" + gen(f"thought_{i}", max_tokens=12, stop="\n") + "\n"
        s += f"Action {i}: " + select(f"action_{i}", choices=ACTIONS) + "["
        s += gen(f"argument_{i}", max_tokens=8, stop="]") + "]\n"
        s += f"Observation {i}: (no tool in this port)\n"
    return s


def main(engine: Any) -> Any:
    return react.run(engine, question="Which is taller, the Eiffel Tower or Big Ben?",
                     temperature=0, seed=0).value

"""Port of SGLang's expert-answer program: pick an expert, then fork two of its answers."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program, select

EXPERTS = ["a mathematician", "a historian", "a chef"]


@program
def expert_answer(s, question: str):
    s += f"Question: {question}\nThe best expert to answer this is "
    s += select("expert", choices=EXPERTS)
    s += ".\n"
    expert = s["expert"]  # waits for the ranking, so each fork's prompt can name it
    forks = s.fork(2)
    forks += lambda i: f"Answer {i + 1} as {expert}:"
    forks += gen("answer", max_tokens=12, stop="\n")
    forks.join()
    return s


def main(engine: Any) -> Any:
    return expert_answer.run(engine, question="How do I bake bread?", temperature=0,
                             seed=0).value

"""Port of SGLang's few-shot QA program: examples in the prompt, one answer line."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program

EXAMPLES = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
]


@program
def few_shot_qa(s, question: str):
    s += "The following are questions with answers.\n\n"
    for q, a in EXAMPLES:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + gen("answer", max_tokens=16, stop="\n")
    return s["answer"]


def main(engine: Any) -> str:
    return few_shot_qa.run(engine, question="What is the capital of Japan?",
                           temperature=0, seed=0).value

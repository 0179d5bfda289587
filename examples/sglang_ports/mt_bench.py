"""Port of SGLang's mt-bench program: two user turns, each answered by the assistant."""

from __future__ import annotations

from typing import Any

from dendrite.program import assistant, gen, program, system, user


@program
def mt_bench(s, question_1: str, question_2: str):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=16))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=16))
    return s


def main(engine: Any) -> Any:
    return mt_bench.run(engine, question_1="Write a haiku about the sea.",
                        question_2="Now make it rhyme.", temperature=0, seed=0).value

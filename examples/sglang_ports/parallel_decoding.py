"""Port of SGLang's parallel-decoding program: expand tips in parallel forks, then
summarize them all in the parent."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program

NUM_TIPS = 3


@program
def tips(s, topic: str):
    s += f"Here are {NUM_TIPS} tips for {topic}:\n"
    forks = s.fork(NUM_TIPS)
    forks += lambda i: f"Tip {i + 1}:"
    forks += gen("tip", max_tokens=12, stop="\n")
    forks.join()
    for i, tip in enumerate(s["tip"]):
        s += f"Tip {i + 1}:{tip}\n"
    s += "In summary," + gen("summary", max_tokens=16, stop="\n")
    return s


def main(engine: Any) -> Any:
    return tips.run(engine, topic="staying healthy", temperature=0, seed=0).value

"""Port of SGLang's tool-use program: choose a tool, then write its argument."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program, select

TOOLS = ["calculator", "search engine"]


@program
def tool_use(s, question: str):
    s += f"To answer this question: {question}, I need to use a "
    s += select("tool", choices=TOOLS)
    s += ". The input to the tool is: " + gen("tool_input", max_tokens=16, stop="\n")
    return s


def main(engine: Any) -> Any:
    return tool_use.run(engine, question="What is 25 * 4?", temperature=0, seed=0).value

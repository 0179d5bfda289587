"""Module-level programs for the replica tests (a replica process imports them)."""

from dendrite.program import program


@program
def answer_twice(s, question: str):
    s += "Question: " + question + "\nAnswer:"
    s.gen("a", max_tokens=6, temperature=0.8)
    kids = s.fork(2)
    for k in kids:
        k.gen("b", max_tokens=5, temperature=0.8)
    return [s["a"]] + [k["b"] for k in kids]


def num_states(result):
    """A summary computed in the replica: nodes of the explored tree."""
    return len(result.tree)

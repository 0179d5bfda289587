"""Port of SGLang's regex program: an IP address constrained by a regex."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program

OCTET = r"(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
IP_REGEX = rf"{OCTET}\.{OCTET}\.{OCTET}\.{OCTET}"


@program
def ip_address(s):
    s += "Q: What is the IP address of the Google DNS servers?\nA: "
    s += gen("answer", max_tokens=16, temperature=0, regex=IP_REGEX)
    return s["answer"]


def main(engine: Any) -> str:
    return ip_address.run(engine, seed=0).value

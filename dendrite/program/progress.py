"""A one-line progress display for running programs (on stderr)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dendrite.program.runtime import Runtime


class Progress:
    """Call after each engine step: shows steps, live branches, tokens, time.

    On a terminal the line is redrawn in place (at most ``hz`` times a
    second); elsewhere a line is printed every ``interval`` seconds.
    """

    def __init__(self, stream: TextIO | None = None, hz: float = 10.0, interval: float = 5.0):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_gap = 1.0 / hz if self.tty else interval
        self._last = 0.0
        self._shown = False

    def line(self, rt: Runtime) -> str:
        """One status line: steps, generations in flight, nodes (pruned), tokens, elapsed."""
        nodes = len(rt.tree)
        pruned = sum(1 for n in rt.tree if n.pruned)
        return (
            f"[dendrite] step {rt.steps} · {rt.num_inflight} generating · "
            f"{nodes} nodes ({pruned} pruned) · {rt.gen_tokens} tokens · {rt.elapsed:.1f}s"
        )

    def __call__(self, rt: Runtime) -> None:
        now = time.perf_counter()
        if now - self._last < self.min_gap:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line(rt))
        else:
            self.stream.write(self.line(rt) + "\n")
        self.stream.flush()
        self._shown = True

    def close(self, rt: Runtime | None = None) -> None:
        """Clear the live line and print a final summary line."""
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
        if rt is not None:
            tps = rt.gen_tokens / rt.elapsed if rt.elapsed > 0 else 0.0
            self.stream.write(
                f"[dendrite] done: {rt.steps} engine steps, {len(rt.tree)} nodes, "
                f"{rt.gen_tokens} generated tokens in {rt.elapsed:.1f}s ({tps:.1f} tok/s)\n"
            )
        self.stream.flush()

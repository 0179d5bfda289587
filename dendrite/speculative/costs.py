"""`StepCosts`: what a speculative step costs in plain steps, measured as the engine runs.

A branch pays for drafting when its acceptance length (tokens a step)
exceeds the cost of a speculative step (drafting, verifying, committing)
counted in plain decode steps of the same batch. That ratio is not a
constant of the device: on an H100 it was 2.3 for SmolLM2-135M verifying
its own n-gram drafts (a 0.65 ms plain step, mostly launches and host work)
and about 1.4 for a 135M draft model ahead of a 13 GB target (a 7.8 ms
plain step bound by its bytes): a fixed threshold either lets the first
speculate at a loss or pauses the second where it would win.

So the rule measures it: the wall time from the end of one engine step to
the end of the next is that step's cost (in steady decode the engine is
never idle in between), averaged per kind (speculative or plain decode)
and width (decoding branches in the step). Once both kinds have
`min_samples` at a width, `break_even(width)` is their ratio; before that,
the configured fallback. An interval more than `gap` times its average is
not a step's cost but a pause of the caller (between two `generate` calls,
say) and is dropped; an inflated first sample (a compile, a first replay)
decays under the averages of the normal steps that follow.
"""

from __future__ import annotations

import time

__all__ = ["StepCosts"]


class StepCosts:
    """Exponential averages of step wall times by (kind, width); see the module docstring."""

    KINDS = ("spec", "plain")

    def __init__(self, fallback: float, alpha: float = 0.2, min_samples: int = 3,
                 gap: float = 4.0) -> None:
        self.fallback = float(fallback)
        self.alpha, self.min_samples, self.gap = alpha, min_samples, gap
        self._avg: dict[tuple[str, int], list[float]] = {}  # -> [seconds, samples]
        self._last: float | None = None

    def note(self, kind: str, width: int, now: float | None = None) -> None:
        """A step of `kind` over `width` decoding branches has just ended."""
        if kind not in self.KINDS:
            raise ValueError(f"StepCosts: kind must be one of {self.KINDS}, got {kind!r}")
        now = time.perf_counter() if now is None else now
        last, self._last = self._last, now
        if last is None:
            return
        dt = now - last
        avg = self._avg.get((kind, width))
        if avg is None:
            self._avg[(kind, width)] = [dt, 1]
        elif dt <= self.gap * avg[0]:
            avg[0] += self.alpha * (dt - avg[0])
            avg[1] += 1

    def skip(self) -> None:
        """The interval until the next step is not a step's cost (something else ran)."""
        self._last = None

    def seconds(self, kind: str, width: int) -> float | None:
        """The average wall time of a `kind` step over `width` branches, once measured."""
        avg = self._avg.get((kind, width))
        return avg[0] if avg is not None and avg[1] >= self.min_samples else None

    def break_even(self, width: int) -> float:
        """Speculative / plain step time at `width`, or the fallback until both are measured."""
        spec, plain = self.seconds("spec", width), self.seconds("plain", width)
        if spec is None or plain is None or plain <= 0:
            return self.fallback
        return spec / plain

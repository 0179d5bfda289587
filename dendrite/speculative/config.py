"""`SpeculativeConfig`: which drafter, which draft trees, and when speculation is off.

`Engine(..., speculative=SpeculativeConfig(...))` turns speculative decoding
on; `SpeculativeConfig.parse("ngram:k=4,n=3")` reads the one-string form the
command line and the DSL take:

    off | ngram[:OPTS] | model:DIR[,OPTS]        OPTS: key=value,...

keys: k (draft depth), width (static tree), tree (static|dynamic), top_k and
budget (dynamic tree), n and n_min (n-gram lengths), draft_temperature
(model drafts drawn, not proposed), max_rows, max_verify, break_even,
probe_every.

The on/off rule (docs/speculative.md has the measurement behind the
defaults): a step speculates only when it has at most `max_rows` decoding
branches (beyond that a batched decode step is already compute-bound and
the verify tokens cost as much as they save), and a branch that has run in
a step of more than `max_rows` branches does not speculate until it has
taken `WIDE_COOLDOWN` plain steps in narrow batches (the ragged tail of a
wide batch, once branches finish, is not a narrow batch), with at most
`max_verify_tokens` tokens in all (default: the largest decode step the
runner replays as a CUDA graph; draft trees are made shallower or trimmed
to fit), and only for the branches
whose recent acceptance length (an exponential average, `ema` weight of the
newest step) is at least `break_even` tokens per step (None: on CUDA the
measured ratio of speculative to plain step time at the step's width,
`StepCosts`; elsewhere, and until measured, `BREAK_EVEN_DEFAULTS`); a branch below it
drafts again after `probe_every` plain steps, to see whether the text
became predictable.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dendrite.speculative.drafters import Drafter
from dendrite.speculative.tree import TREE_KINDS, TreeShape

if TYPE_CHECKING:
    from dendrite.engine import Engine

__all__ = ["BREAK_EVEN_DEFAULTS", "METHODS", "SpeculativeConfig", "speculating"]

#: Drafting methods by name.
METHODS = ("ngram", "model")

#: `break_even` when the config leaves it None, by the engine's device type
#: (docs/speculative.md, "The on/off rule"): the verify step's cost in plain
#: steps, measured by benchmarks/bench_speculative.py's rule table. CUDA:
#: 2.0-3.1 on an H100 over 1-32 branches (SmolLM2-135M, bf16, graphs),
#: median 2.7; CPU: 1.2-2.3 up to 8 branches (float32), 2.0 kept. Other
#: devices take the CPU value.
BREAK_EVEN_DEFAULTS = {"cuda": 2.7, "cpu": 2.0}

_INT_KEYS = {"k": "num_draft", "width": "width", "top_k": "top_k", "budget": "budget",
             "n": "ngram_max", "n_min": "ngram_min", "max_rows": "max_rows",
             "max_verify": "max_verify_tokens", "probe_every": "probe_every"}
_FLOAT_KEYS = {"break_even": "break_even", "draft_temperature": "draft_temperature"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings (see the module docstring)."""

    method: str = "ngram"
    draft_model: str | None = None  # model directory, for method "model"
    drafter: Drafter | None = field(default=None, compare=False)  # a ready drafter wins
    tree: str = "static"
    num_draft: int = 4  # draft tokens per path (tree depth)
    width: int = 1  # static tree: branches at the first draft token
    top_k: int = 4  # dynamic tree
    budget: int = 16  # dynamic tree: nodes kept
    ngram_min: int = 1
    ngram_max: int = 3
    draft_pages: int = 2048  # the draft model's KV pool (pages)
    #: The draft model's sampling: 0 proposes its best tokens; > 0 draws the
    #: drafts and verifies them by rejection sampling (see verify.py).
    draft_temperature: float = 0.0
    #: The rule (see the module docstring and docs/speculative.md).
    max_rows: int = 8
    #: Tokens one speculative step may verify (None: the largest decode step
    #: the runner replays as a CUDA graph, else the engine's step budget).
    max_verify_tokens: int | None = None
    #: None: on CUDA measured as the engine runs (speculative / plain step
    #: time per batch width, `dendrite.speculative.costs.StepCosts`), starting
    #: from `BREAK_EVEN_DEFAULTS`; elsewhere that default. A number: fixed.
    break_even: float | None = None
    ema: float = 0.5
    probe_every: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if self.method == "model" and self.draft_model is None and self.drafter is None:
            raise ValueError("speculative method 'model' needs draft_model (a model directory)")
        if self.drafter is not None and not isinstance(self.drafter, Drafter):
            raise TypeError(f"drafter must implement Drafter (propose, forget), got "
                            f"{type(self.drafter).__name__}")
        if self.tree not in TREE_KINDS:
            raise ValueError(f"speculative tree must be one of {', '.join(TREE_KINDS)}, "
                             f"got {self.tree!r}")
        for name in ("num_draft", "width", "top_k", "budget", "ngram_min", "ngram_max",
                     "draft_pages", "max_rows", "probe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative {name} must be an int >= 1, got {v!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"speculative n_min ({self.ngram_min}) must be <= n "
                             f"({self.ngram_max})")
        mv = self.max_verify_tokens
        if mv is not None and (isinstance(mv, bool) or not isinstance(mv, int) or mv < 2):
            raise ValueError(f"speculative max_verify_tokens must be an int >= 2 or None, "
                             f"got {mv!r}")
        for name, low, high in (("break_even", 0.0, float("inf")), ("ema", 0.0, 1.0),
                                ("draft_temperature", 0.0, 1e6)):
            v = getattr(self, name)
            if name == "break_even" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"speculative {name} must be a number in [{low}, {high}], "
                                 f"got {v!r}")

    @property
    def shape(self) -> TreeShape:
        """The draft trees' shape."""
        return TreeShape(kind=self.tree, depth=self.num_draft, width=self.width,
                         top_k=self.top_k, budget=self.budget)

    @classmethod
    def parse(cls, spec: str | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """`off` / `ngram[:OPTS]` / `model:DIR[,OPTS]` -> a config (None for off)."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"speculative must be a string like 'ngram:k=4' or a "
                            f"SpeculativeConfig, got {type(spec).__name__}")
        text = spec.strip()
        if text in ("", "off", "none"):
            return None
        method, _, rest = text.partition(":")
        if method not in METHODS:
            raise ValueError(f"speculative: unknown method {method!r} in {spec!r}; allowed: "
                             f"off, ngram[:k=4,...], model:DIR[,k=4,...]")
        parts = [p.strip() for p in rest.split(",")] if rest else []
        kw: dict[str, object] = {"method": method}
        if method == "model":
            if not parts or not parts[0] or "=" in parts[0]:
                raise ValueError(f"speculative: 'model' needs a directory, as model:DIR, "
                                 f"got {spec!r}")
            kw["draft_model"] = str(Path(parts.pop(0)).expanduser())
        for part in parts:
            key, eq, val = part.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"speculative: option {part!r} must be key=value")
            if key == "tree":
                kw["tree"] = val.strip()
            elif key in _INT_KEYS:
                try:
                    kw[_INT_KEYS[key]] = int(val)
                except ValueError:
                    raise ValueError(f"speculative: {key} must be an int, got {val!r}") from None
            elif key in _FLOAT_KEYS:
                try:
                    kw[_FLOAT_KEYS[key]] = float(val)
                except ValueError:
                    raise ValueError(f"speculative: {key} must be a number, got {val!r}") \
                        from None
            else:
                allowed = ", ".join(["tree", *_INT_KEYS, *_FLOAT_KEYS])
                raise ValueError(f"speculative: unknown option {key!r}; allowed: {allowed}")
        return cls(**kw)

    def break_even_for(self, device_type: str) -> float:
        """`break_even`, or the default for `device_type` ("cuda", "cpu", ...) when None."""
        if self.break_even is not None:
            return float(self.break_even)
        return BREAK_EVEN_DEFAULTS.get(device_type, BREAK_EVEN_DEFAULTS["cpu"])

    def with_(self, **changes) -> SpeculativeConfig:
        """A copy with `changes`."""
        return replace(self, **changes)

    def make_drafter(self, engine: Engine) -> Drafter:
        """The drafter this config names, built for `engine`'s tokenizer and device."""
        if self.drafter is not None:
            return self.drafter
        from dendrite.speculative.drafters import ModelDrafter, NgramDrafter

        if self.method == "ngram":
            return NgramDrafter(self.ngram_min, self.ngram_max)
        return ModelDrafter(self.draft_model, tokenizer=engine.tokenizer, device=engine.device,
                            dtype=engine.runner.dtype, num_pages=self.draft_pages,
                            page_size=engine.page_size, vocab_size=engine.runner.vocab_size,
                            temperature=self.draft_temperature)

    def attach(self, engine: Engine):
        """The `dendrite.speculative.step.Speculator` the engine's steps call (the
        engine's one entry point into this package)."""
        from dendrite.speculative.step import Speculator

        return Speculator(engine, self)


@contextmanager
def speculating(engine: Engine, spec: str | SpeculativeConfig | None):
    """Run the body with `engine` speculating as `spec` says ("off"/None: not at
    all); the engine's own setting comes back afterwards. A program's
    `run(engine, speculative=...)` is this around the run."""
    config = SpeculativeConfig.parse(spec)
    with engine._lock:
        old = engine._spec
        if config is None:
            new = None
        elif old is not None and getattr(old, "config", None) == config:
            new = old  # the same settings: keep its drafter (and a draft model's KV)
        else:
            new = config.attach(engine)
        engine._spec = new
    try:
        yield
    finally:
        with engine._lock:
            engine._spec = old

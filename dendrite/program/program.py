"""`@program` (`dendrite.program.program`): a Python function over a state, runnable on an engine."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from dendrite.program.options import SAMPLING_OPTIONS, check_gen_options, suggest
from dendrite.program.runtime import ProgressStop, Runtime
from dendrite.program.state import State
from dendrite.program.tree import Tree


@dataclass(frozen=True)
class Param:
    """One program argument: name and default (``Param.REQUIRED`` when none)."""

    name: str
    default: Any = inspect.Parameter.empty
    annotation: Any = None

    REQUIRED = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is inspect.Parameter.empty


@dataclass
class ProgramResult:
    """What `Program.run` returns.

    ``value`` is the program's return value; ``state`` its root state;
    ``tree`` the record of every explored state; ``steps`` the number of
    ``engine.step()`` calls the run made (shared by a whole ``run_batch``).
    ``result["x"]`` reads a capture of the root state, SGLang style.
    """

    value: Any
    state: State
    tree: Tree
    steps: int
    seconds: float
    gen_tokens: int
    args: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.state[name]

    @property
    def text(self) -> str:
        """The root state's text."""
        return self.state.text

    def __repr__(self) -> str:
        return (
            f"ProgramResult(value={self.value!r}, nodes={len(self.tree)}, "
            f"steps={self.steps}, gen_tokens={self.gen_tokens}, seconds={self.seconds:.2f})"
        )


class Program:
    """A program: ``fn(s, **args)`` over a root `State`.

    Call it with a state to run it inline inside another program
    (``sub(s, x=1)``), or run it on an engine with `run` / `run_batch`.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        params: Sequence[Param] | None = None,
        doc: str | None = None,
    ):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "program")
        self.__doc__ = doc if doc is not None else getattr(fn, "__doc__", None)
        self.__name__ = self.name
        self.__wrapped__ = fn
        if params is None:
            sig = inspect.signature(fn)
            ps = list(sig.parameters.values())[1:]  # drop the state
            params = [
                Param(p.name, p.default, None if p.annotation is p.empty else p.annotation)
                for p in ps
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
        self.params: list[Param] = list(params)

    def __call__(self, s: State, *args: Any, **kwargs: Any) -> Any:
        """Run the program inline on state ``s`` (as a sub-program)."""
        return self.fn(s, *args, **kwargs)

    def __repr__(self) -> str:
        ps = ", ".join(p.name if p.required else f"{p.name}={p.default!r}" for p in self.params)
        return f"<Program {self.name}({ps})>"

    def bind(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Check argument names and fill defaults; raise TypeError on a mismatch."""
        known = {p.name for p in self.params}
        extra = [k for k in args if k not in known]
        if extra:
            raise TypeError(f"{self.name}() got unexpected argument(s) {', '.join(extra)}")
        out = {}
        for p in self.params:
            if p.name in args:
                out[p.name] = args[p.name]
            elif p.required:
                raise TypeError(f"{self.name}() missing required argument '{p.name}'")
            else:
                out[p.name] = p.default
        return out

    def run(
        self,
        engine: Any,
        *,
        seed: int | None = None,
        progress: Callable[[Runtime], None] | None = None,
        max_steps: int | None = None,
        max_branches: int | None = None,
        on_text: Callable[[State, str, str], None] | None = None,
        sampling: Mapping[str, Any] | None = None,
        speculative: Any = None,
        **args: Any,
    ) -> ProgramResult:
        """Run on ``engine``; every state gets a seed derived from ``seed`` and its path.

        Reserved keywords: ``seed``, ``progress`` (a callback after each step;
        what it raises stops the run and reaches the caller unchanged),
        ``max_steps`` (engine steps the run may take, default
        `dendrite.program.runtime.DEFAULT_MAX_STEPS`; past it the run fails with
        `StepBudgetExceeded`) and ``max_branches`` (live branches at once,
        default `MAX_BRANCHES`; a fork past it is a ValueError) and
        ``on_text`` (streaming: ``on_text(state, name, delta)`` with each gen's
        new text as it is produced, see `dendrite.program.runtime`).

        Sampling defaults for every gen of the run that does not set them:
        ``run(engine, temperature=0, max_tokens=64)`` (a gen sampling option
        that is not a parameter of the program; one that is goes to the
        program), or ``sampling={"temperature": 0}`` (always defaults).

        ``speculative``: speculative decoding for this run ("ngram:k=4",
        "model:DIR", a `dendrite.speculative.SpeculativeConfig`, or "off");
        None keeps the engine's own setting. Exact: the same tokens either way.
        """
        defaults = dict(sampling or {})
        for k in [k for k in args if k in SAMPLING_OPTIONS and k not in self._param_names]:
            if k in defaults:
                raise TypeError(f"{self.name}: sampling default {k!r} given twice "
                                f"(as {k}= and in sampling=)")
            defaults[k] = args.pop(k)
        return self.run_batch(engine, [args], seed=seed, progress=progress,
                              max_steps=max_steps, max_branches=max_branches,
                              on_text=on_text, sampling=defaults, speculative=speculative)[0]

    @property
    def _param_names(self) -> set[str]:
        return {p.name for p in self.params}

    def run_batch(
        self,
        engine: Any,
        batch: Sequence[Mapping[str, Any]],
        *,
        seed: int | None = None,
        progress: Callable[[Runtime], None] | None = None,
        max_steps: int | None = None,
        max_branches: int | None = None,
        on_text: Callable[[State, str, str], None] | None = None,
        sampling: Mapping[str, Any] | None = None,
        speculative: Any = None,
    ) -> list[ProgramResult]:
        """Run several instances sharing the same engine steps.

        Instance ``i`` runs with seed ``seed + i``, so ``run_batch(b, seed=S)[i]``
        draws what ``run(**b[i], seed=S + i)`` draws. ``max_steps`` and
        ``max_branches`` bound the whole batch (see `run`).
        """
        defaults = check_sampling_defaults(sampling or {})  # see `run`
        if speculative is not None:  # (checked before anything runs, as the rest)
            from dendrite.speculative import speculating

            with speculating(engine, speculative):
                return self.run_batch(engine, batch, seed=seed, progress=progress,
                                      max_steps=max_steps, max_branches=max_branches,
                                      on_text=on_text, sampling=defaults)
        bound = [self.bind(a) for a in batch]
        rt = Runtime(engine, progress=progress, max_steps=max_steps, max_branches=max_branches,
                     on_text=on_text, gen_defaults=defaults)
        roots = [
            rt.new_root(None if seed is None else int(seed) + i)
            for i in range(len(bound))
        ]
        try:
            if len(bound) == 1:
                values = [self.fn(roots[0], **bound[0])]
            else:
                values = rt.run_tasks(
                    [(lambda r=r, a=a: self.fn(r, **a)) for r, a in zip(roots, bound)]
                )
            rt.drain()
        except ProgressStop as stop:
            raise stop.exc from None
        finally:
            rt.release_all()
        return [
            ProgramResult(v, r, rt.tree, rt.steps, rt.elapsed, rt.gen_tokens, a)
            for v, r, a in zip(values, roots, bound)
        ]


def check_sampling_defaults(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """A run's sampling defaults, checked as gen options (a TypeError naming the bad one)."""
    if not isinstance(sampling, Mapping):
        raise TypeError(f"sampling must be a dict of gen sampling options, got {type(sampling).__name__}")
    for k in sampling:
        if k not in SAMPLING_OPTIONS:
            raise TypeError(f"sampling: {k!r} is not a sampling option{suggest(str(k), SAMPLING_OPTIONS)}")
    check_gen_options(dict(sampling))
    return dict(sampling)


def program(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """Decorator making a `Program`: ``@program`` or ``@program(name="x")``
    (``from dendrite.program import program``)."""
    if fn is None:
        return lambda f: Program(f, name=name)
    return Program(fn, name=name)

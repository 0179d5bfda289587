"""`KernelConfig`: which optional GPU kernels a model runner may use, and how
many threads fill a step's grammar masks.

A runner holds one frozen `KernelConfig` (its `kernels` argument, default
`KernelConfig.from_env()`) and passes it down with every step: to the model's
layers, to the CUDA graphs it captures and to the engine's sampler and grammar
mask worker. No layer or kernel looks anything up on its own, so two runners
in one process can differ, and a test turns a kernel off by building its
runner with a config.

Each flag allows a kernel family where it applies (CUDA, fp16/bf16, the shapes
it handles, Triton importable); off, the torch ops run instead.

This module is the only place that reads the `DENDRITE_*` tuning variables,
and only in `from_env()`, for its defaults ("0" turns a family off, e.g. to
compare against the torch ops; "1" or unset leaves it on):

    DENDRITE_GEMV             single-row matmul of single-stream decode (gemv.py)
    DENDRITE_SKINNY           2-16-row matmul of a few decode branches (skinny.py)
    DENDRITE_FUSED_ROWS       RMSNorm(+residual), SiLU*up, RoPE+KV write (rows.py)
    DENDRITE_FUSED_SAMPLING   the one-pass CUDA sampler (sample.py)
    DENDRITE_TREE_ATTENTION   tree attention in the cascade CUDA graphs (tree_attention.py)
    DENDRITE_GRAMMAR_THREADS  an int: llguidance pool threads for a step's grammar
                              masks; unset or 0 fills them one after another on
                              one thread (dendrite/grammar/masks.py `fill_masks`)

The package's other environment variables are not tuning choices and are read
where they apply: DENDRITE_MODEL (the engine's default model directory,
dendrite/engine.py) and DENDRITE_CACHE (where the default model is cached,
dendrite/default_model.py).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["ENV_VARS", "KernelConfig", "triton_available"]

#: Field of `KernelConfig` -> the environment variable that sets its default.
ENV_VARS = {
    "gemv": "DENDRITE_GEMV",
    "skinny": "DENDRITE_SKINNY",
    "fused_rows": "DENDRITE_FUSED_ROWS",
    "fused_sampling": "DENDRITE_FUSED_SAMPLING",
    "tree_attention": "DENDRITE_TREE_ATTENTION",
    "grammar_threads": "DENDRITE_GRAMMAR_THREADS",
}

#: The kernel-family flags (every field but `grammar_threads`).
_FLAGS = tuple(name for name in ENV_VARS if name != "grammar_threads")

_ON = ("", "1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class KernelConfig:
    """Which Triton kernel families may run, and the grammar mask threads
    (see the module docstring)."""

    gemv: bool = True
    skinny: bool = True
    fused_rows: bool = True
    fused_sampling: bool = True
    tree_attention: bool = True
    #: llguidance pool threads that fill a step's grammar masks; 0 fills them
    #: one after another on one thread, which measured faster for one grammar's
    #: branches (see `dendrite.grammar.fill_masks`).
    grammar_threads: int = 0

    def __post_init__(self) -> None:
        for name in _FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"KernelConfig.{name} must be a bool, got {value!r}")
        n = self.grammar_threads
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"KernelConfig.grammar_threads must be an int, got {n!r}")
        if n < 0:
            raise ValueError(f"KernelConfig.grammar_threads must be >= 0 (0 = no thread pool), "
                             f"got {n}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """Every family on unless its variable (ENV_VARS) is "0" in `environ`
        (default os.environ); grammar threads from DENDRITE_GRAMMAR_THREADS."""
        env = os.environ if environ is None else environ
        flags: dict[str, bool] = {}
        for name in _FLAGS:
            var = ENV_VARS[name]
            raw = env.get(var, "")
            value = raw.strip().lower()
            if value not in _ON + _OFF:
                raise ValueError(f"{var} must be 0 or 1, got {raw!r}")
            flags[name] = value in _ON
        var = ENV_VARS["grammar_threads"]
        raw = env.get(var, "")
        digits = raw.strip() or "0"
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{var} must be an int >= 0 (0 = no thread pool), got {raw!r}")
        return cls(**flags, grammar_threads=int(digits))

    @classmethod
    def torch_only(cls) -> KernelConfig:
        """Every family off: the plain torch ops everywhere (a reference to compare with)."""
        return cls(**{name: False for name in _FLAGS})


_triton_importable: bool | None = None


# Dynamo treats the answer as a constant instead of tracing into importlib
# (which would break a fullgraph compile of any layer that asks); it cannot
# change within a process. A module global, not functools.cache: Dynamo looks
# through cache wrappers.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton imports (CPU installs lack it); asked once per process."""
    global _triton_importable
    if _triton_importable is None:
        try:
            importlib.import_module("triton")
            _triton_importable = True
        except ImportError:
            _triton_importable = False
    return _triton_importable

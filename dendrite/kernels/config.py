"""`KernelConfig`: which optional GPU kernels a model runner may use.

A runner holds one frozen `KernelConfig` (its `kernels` argument, default
`KernelConfig.from_env()`) and passes it down with every step: to the model's
layers, to the CUDA graphs it captures and to the engine's sampler. No layer
or kernel looks anything up on its own, so two runners in one process can
differ, and a test turns a kernel off by building its runner with a config.

Each flag allows a kernel family where it applies (CUDA, fp16/bf16, the shapes
it handles, Triton importable); off, the torch ops run instead.

This module is the only place that reads the `DENDRITE_*` kernel variables,
and only in `from_env()`, for its defaults ("0" turns a family off, e.g. to
compare against the torch ops; "1" or unset leaves it on):

    DENDRITE_GEMV            single-row matmul of single-stream decode (gemv.py)
    DENDRITE_SKINNY          2-16-row matmul of a few decode branches (skinny.py)
    DENDRITE_FUSED_ROWS      RMSNorm(+residual), SiLU*up, RoPE+KV write (rows.py)
    DENDRITE_FUSED_SAMPLING  the one-pass CUDA sampler (sample.py)
    DENDRITE_TREE_ATTENTION  tree attention in the cascade CUDA graphs (tree_attention.py)

The package's other environment variables are not kernel choices and are read
where they apply: DENDRITE_MODEL (the engine's default model directory,
dendrite/engine.py), DENDRITE_CACHE (where the default model is cached,
dendrite/default_model.py) and DENDRITE_GRAMMAR_THREADS (the grammar mask
thread pool, dendrite/grammar/masks.py).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

__all__ = ["ENV_VARS", "KernelConfig", "triton_available"]

#: Field of `KernelConfig` -> the environment variable that sets its default.
ENV_VARS = {
    "gemv": "DENDRITE_GEMV",
    "skinny": "DENDRITE_SKINNY",
    "fused_rows": "DENDRITE_FUSED_ROWS",
    "fused_sampling": "DENDRITE_FUSED_SAMPLING",
    "tree_attention": "DENDRITE_TREE_ATTENTION",
}

_ON = ("", "1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class KernelConfig:
    """Which Triton kernel families may run (see the module docstring)."""

    gemv: bool = True
    skinny: bool = True
    fused_rows: bool = True
    fused_sampling: bool = True
    tree_attention: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise TypeError(f"KernelConfig.{f.name} must be a bool, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """Every family on unless its variable (ENV_VARS) is "0" in `environ` (default os.environ)."""
        env = os.environ if environ is None else environ
        flags = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var, "")
            value = raw.strip().lower()
            if value not in _ON + _OFF:
                raise ValueError(f"{var} must be 0 or 1, got {raw!r}")
            flags[name] = value in _ON
        return cls(**flags)

    @classmethod
    def torch_only(cls) -> KernelConfig:
        """Every family off: the plain torch ops everywhere (a reference to compare with)."""
        return cls(**{name: False for name in ENV_VARS})


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (CPU installs lack it); asked once per process."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True

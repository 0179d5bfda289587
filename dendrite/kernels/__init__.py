"""Custom GPU kernels (Triton); each entry point falls back to plain torch.

Which families may run is a `KernelConfig` (dendrite/kernels/config.py) that
the model runner passes down; the functions here default to every family on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dendrite.kernels import skinny as _skinny
from dendrite.kernels.config import KernelConfig
from dendrite.kernels.gemv import gemv, supported
from dendrite.kernels.skinny import skinny

__all__ = ["KernelConfig", "gemv", "linear", "skinny", "skinny_supported", "supported"]

skinny_supported = _skinny.supported

_ALL = KernelConfig()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           kernels: KernelConfig = _ALL) -> torch.Tensor:
    """`F.linear`, through the GEMV kernel for one CUDA row and the few-row kernel
    for 2-16, where `kernels` allows them."""
    if supported(x, weight, kernels=kernels):
        return gemv(x, weight, bias)
    if skinny_supported(x, weight, kernels=kernels):
        return skinny(x, weight, bias)
    return F.linear(x, weight, bias)

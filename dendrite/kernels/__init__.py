"""Custom GPU kernels (Triton); each entry point falls back to plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dendrite.kernels import skinny as _skinny
from dendrite.kernels.gemv import gemv, supported
from dendrite.kernels.skinny import skinny

__all__ = ["gemv", "linear", "skinny", "skinny_supported", "supported"]

skinny_supported = _skinny.supported


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through the GEMV kernel for one CUDA row and the few-row kernel for 2-16."""
    if supported(x, weight):
        return gemv(x, weight, bias)
    if skinny_supported(x, weight):
        return skinny(x, weight, bias)
    return F.linear(x, weight, bias)

"""Custom GPU kernels (Triton); each entry point falls back to plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dendrite.kernels.gemv import gemv, supported

__all__ = ["gemv", "linear", "supported"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through the single-row GEMV kernel for one CUDA row."""
    if supported(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)

"""`QuantLinear`: a projection whose weight is stored as FP8 / MXFP8.

It replaces `nn.Linear` for the attention and MLP projections (qkv_proj,
o_proj, gate_up_proj, down_proj) of a quantized model; embeddings, norms and
lm_head stay in the model dtype. The weight is two buffers, `weight` (e4m3
[N, K]) and `weight_scale` (the block grid, see dendrite/quant/formats.py),
plus an optional `bias` parameter in the model dtype.

`forward` runs the Triton kernels (dendrite/kernels/fp8_matmul.py) where they
apply (CUDA, sm_89+, bf16/fp16) and otherwise dequantizes the weight to the
activation dtype and calls `F.linear` — the CPU path, and the reference the
kernels are tested against. Single-stream decode steps do not call
`forward`: the model's fused GEMV reads `weight` and `weight_scale` itself,
with the RMSNorms, SiLU*up and residual adds fused in (`_StepKernels.choose`
in dendrite/model/llama.py); steps of more rows go through `forward`.

`Module.to(dtype)` (and `.half()`, `to_empty`, ...) moves the buffers to the
new device but keeps their dtypes: casting e4m3 or the float32 scales to the
model dtype would silently change the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dendrite.kernels import fp8_matmul as _kernel
from dendrite.quant.formats import FP8, QuantizedWeight, dequantize

__all__ = ["QuantLinear", "quant_linear", "weight_format"]


def quant_linear(x: torch.Tensor, q: QuantizedWeight,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(q).T [+ bias]` for x [..., K]: the FP8 kernels on CUDA, else
    dequantize to x's dtype and `F.linear`."""
    x2 = x.reshape(-1, x.shape[-1])
    if _kernel.supported(x2, q.data, q.scale, q.block):
        y = _kernel.fp8_matmul(x2, q.data, q.scale, q.block, bias)
    else:
        y = F.linear(x2, dequantize(q, x.dtype), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class QuantLinear(nn.Module):
    """`y = x @ dequant(W).T + b` with W held as e4m3 data and block scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 block: tuple[int, int], mx: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        grid = (-(-out_features // self.block[0]), -(-in_features // self.block[1]))
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale",
                             torch.empty(grid, dtype=torch.uint8 if mx else torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    @property
    def format(self) -> str:
        """'fp8' or 'mxfp8'."""
        return "mxfp8" if self.weight_scale.dtype == torch.uint8 else "fp8"

    @property
    def quantized(self) -> QuantizedWeight:
        """The stored weight (views of the buffers)."""
        return QuantizedWeight(self.weight, self.weight_scale, self.block)

    def set_weight(self, q: QuantizedWeight) -> None:
        """Copy `q` into the buffers; its shape, block and format must be this module's."""
        if q.shape != tuple(self.weight.shape) or q.block != self.block \
                or q.scale.dtype != self.weight_scale.dtype:
            raise ValueError(
                f"quantized weight {q.shape} {q.format} in blocks {q.block} does not fit "
                f"{tuple(self.weight.shape)} {self.format} in blocks {self.block}")
        self.weight.copy_(q.data)
        self.weight_scale.copy_(q.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ dequant(W).T [+ bias]` (`quant_linear`)."""
        return quant_linear(x, self.quantized, self.bias)

    def extra_repr(self) -> str:
        """Sizes, format and block, for print(model)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, block={self.block}, bias={self.bias is not None}")

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Let `fn` move the e4m3 data and the scales but never cast them.
        kept = {name: self._buffers.pop(name) for name in ("weight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, device=kept["weight"].device))
            device = probe.device if isinstance(probe, torch.Tensor) else kept["weight"].device
            for name, t in kept.items():
                if t.device != device:
                    t = (torch.empty_like(t, device=device) if t.is_meta
                         else t.to(device))
                self._buffers[name] = t
        return self


def weight_format(model: nn.Module) -> str:
    """'fp8' / 'mxfp8' when `model` holds QuantLinear projections, else 'none'."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            return m.format
    return "none"

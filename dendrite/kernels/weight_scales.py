"""FP8 block-scaled weights in the matmul kernels: when they apply and how a
tile follows the scale blocks.

The single-row (gemv.py) and few-row (skinny.py) kernels take either a dense
weight in the activation dtype or an e4m3 weight with its block scales
(`dendrite.quant.formats.QuantizedWeight`: float32 multipliers for "fp8",
uint8 e8m0 exponents for "mxfp8"), dequantized in registers by the helpers in
`_weight_scales_triton.py`; more rows take fp8_matmul.py's kernel. This
module holds the host-side rules: which weights they accept (`accepts`), how
a GEMV program applies the scales (`gemv_mode`) and which K chunk a
tensor-core tile may take (`chunk_inside_blocks`).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["FP8", "accepts", "chunk_inside_blocks", "fp8_capable", "gemv_mode", "weight_fits"]

FP8 = torch.float8_e4m3fn


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_capable(device: torch.device) -> bool:
    """e4m3 conversions in Triton need sm_89 (Ada) or newer."""
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def accepts(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> bool:
    """An e4m3 [N, K] weight on an FP8-capable GPU with a contiguous float32 or
    uint8 scale grid [ceil(N / rows), ceil(K / cols)] for `block = (rows, cols)`."""
    if not (weight.dtype == FP8 and weight.dim() == 2 and weight.is_contiguous()
            and scale.dim() == 2 and scale.is_contiguous()
            and scale.dtype in (torch.float32, torch.uint8)
            and len(block) == 2 and min(block) > 0
            and weight.is_cuda and scale.device == weight.device):
        return False
    n, k = weight.shape
    grid = (-(-n // block[0]), -(-k // block[1]))
    return tuple(scale.shape) == grid and fp8_capable(weight.device)


def weight_fits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                block: tuple[int, int] | None) -> bool:
    """The weight half of a kernel's `supported`: dense in x's dtype (no
    `scale`), or e4m3 with a `scale` grid and `block` that `accepts` takes."""
    if scale is None:
        return weight.dtype == x.dtype
    return block is not None and accepts(weight, scale, block)


def gemv_mode(n: int, k: int, block: tuple[int, int], block_n: int, block_k: int
              ) -> tuple[int, int, int] | None:
    """(SCALES, G, GROUP) of the single-row kernel for W [n, k] in tiles of
    block_n rows x block_k columns, or None when its chunks cut scale blocks.

    SCALES 1: each program's rows lie in one row of scale blocks, so the
    scales depend on the column only and are folded into x (any column
    block). SCALES 2: scales vary along the rows (MXFP8's 1 x 32); products
    are summed per GROUP columns (G groups per chunk, each inside one block)
    and then scaled."""
    rows, cols = block
    if rows % block_n == 0 or rows >= n:
        return 1, 1, block_k
    if cols >= k or cols % block_k == 0:
        return 2, 1, block_k
    if block_k % cols == 0 and cols & (cols - 1) == 0:
        return 2, block_k // cols, cols
    return None


def chunk_inside_blocks(block_k: int, k: int, cols: int) -> int | None:
    """The largest power-of-two K chunk <= block_k (at least 16, the MMA's K)
    that never crosses a column of scale blocks `cols` wide, or None."""
    bk = block_k
    while bk >= 16:
        if cols >= k or cols % bk == 0:
            return bk
        bk //= 2
    return None

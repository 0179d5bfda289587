"""Quantize-on-write of N-bit KV pages: rotate, quantize and pack new K or V rows in one Triton kernel.

`write_rows(x, slot_mapping, pages, rotation, fmt)` stores `x` [T, Hkv, D] at
its slots of `pages` (uint8 [num_pages, page_size, Hkv, row_bytes]) in the
format of dendrite/model/kv_quant.py, one launch for all tokens and heads,
where the torch path (`KVQuantFormat.quantize`) takes a rotation matmul plus
about twenty elementwise kernels. Its bytes equal the torch writer's except
where float32 summation order or a rounding tie moves a code by one step.
"""

from __future__ import annotations

import torch

from dendrite.kernels.config import triton_available
from dendrite.model.kv_quant import KVQuantFormat

__all__ = ["supported", "write_rows"]

#: Tokens per program.
BLOCK_T = 16


def supported(fmt: KVQuantFormat, device: torch.device | str) -> bool:
    """Whether the Triton writer runs this format on `device` (head_dim a power of two
    in [16, 128]: the float32 rotation matrix, D * D * 4 bytes, is a `tl.dot` operand)."""
    d = fmt.head_dim
    return (torch.device(device).type == "cuda" and triton_available()
            and 16 <= d <= 128 and d & (d - 1) == 0)


def write_rows(x: torch.Tensor, slot_mapping: torch.Tensor, pages: torch.Tensor,
               rotation: torch.Tensor, fmt: KVQuantFormat) -> None:
    """Rotate, quantize and store `x` [T, Hkv, D] at `slot_mapping` [T] of `pages`."""
    from dendrite.kernels._kv_quant_triton import quant_write

    t, hkv, d = x.shape
    if t == 0:
        return
    quant_write[(_cdiv(t, BLOCK_T), hkv)](
        x.contiguous(), rotation.float().contiguous(), slot_mapping, pages, t,
        HKV=hkv, D=d, ROW=fmt.row_bytes, BITS=fmt.bits, GROUP=fmt.group_size,
        CODE_BYTES=fmt.code_bytes, BLOCK_T=BLOCK_T, num_warps=4,
    )


def _cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints."""
    return -(-a // b)

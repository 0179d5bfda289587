"""The all-reduce that sums row-parallel partial outputs over the ranks.

`make_all_reduce(kind, ...)` returns `f(x) -> x summed over ranks` (in place
where it can), set as every `DecoderLayer.all_reduce`:

* "nccl" (default on CUDA) / "gloo" (the CPU): `torch.distributed.all_reduce`
  on the default group. NCCL collectives are captured into CUDA graphs (the
  communicator is initialised eagerly, before any capture).
* "symm_mem" (CUDA, opt-in): torch's symmetric-memory one-shot all-reduce
  (`torch.ops.symm_mem.one_shot_all_reduce`): every rank copies its partial
  into a buffer that all peers map over NVLink and each reads all peers'
  copies, one kernel and no NCCL protocol; meant for decode-sized messages
  (a few rows of `hidden_size`). Larger tensors fall back to NCCL.
  benchmarks/bench_parallel.py measures both for the decode message size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["ALL_REDUCE_KINDS", "make_all_reduce"]

ALL_REDUCE_KINDS = ("auto", "nccl", "gloo", "symm_mem")


def _collective(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


class _SymmMemAllReduce:
    """One-shot all-reduce through a symmetric-memory buffer of `max_numel`."""

    def __init__(self, max_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.max_numel, self.dtype = max_numel, dtype
        self.buf = symm_mem.empty(max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buf, self.group_name)
        self.op = torch.ops.symm_mem.one_shot_all_reduce

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        if n > self.max_numel or x.dtype != self.dtype:
            return _collective(x)
        self.buf[:n].copy_(x.reshape(-1))
        return self.op(self.buf[:n], "sum", self.group_name).view_as(x)


def make_all_reduce(kind: str, device: torch.device, *, dtype: torch.dtype | None = None,
                    max_numel: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The all-reduce of `kind` (one of `ALL_REDUCE_KINDS`; "auto": NCCL on
    CUDA, gloo on the CPU). "symm_mem" needs CUDA, `dtype` and `max_numel`
    (the largest tensor it handles itself)."""
    if kind not in ALL_REDUCE_KINDS:
        raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCE_KINDS)}, "
                         f"got {kind!r}")
    if kind == "symm_mem":
        if device.type != "cuda" or dtype is None or max_numel < 1:
            raise ValueError("all_reduce 'symm_mem' needs a CUDA device, a dtype and "
                             "max_numel >= 1")
        return _SymmMemAllReduce(max_numel, dtype, device)
    if kind == "nccl" and device.type != "cuda":
        raise ValueError(f"all_reduce 'nccl' needs a CUDA device, got {device}")
    if kind == "gloo" and device.type != "cpu":
        raise ValueError(f"all_reduce 'gloo' runs on the CPU, got {device}")
    return _collective

"""The tensor-parallel process group: who this process is and how ranks talk.

One process per rank. `init_group` joins the `torch.distributed` group
(gloo on the CPU, NCCL on CUDA, with a timeout so that a lost peer ends a
collective with an error instead of a hang) and picks the rank's device
(`cuda:<local rank>`). Rank and world size come from the engine's launcher
(dendrite/parallel/launch.py) or, under `torchrun`, from its environment
variables (`torchrun_env`).

Only one tensor-parallel group exists per process at a time (it is
`torch.distributed`'s default group): `init_group` refuses a second one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "TPGroup", "init_group", "rank_device", "torchrun_env"]

#: Seconds a collective may wait for a peer before it fails (a peer that died
#: mid-step on NCCL is otherwise only noticed by the launcher's watchdog).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    backend: str  # "gloo" or "nccl"

    @property
    def is_leader(self) -> bool:
        """Rank 0: the one that holds the engine, the KV tree and the sampler."""
        return self.rank == 0

    def destroy(self) -> None:
        """Leave the group (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun, else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                  "MASTER_PORT")):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def rank_device(device: torch.device | str, local_rank: int) -> torch.device:
    """The device of a rank: `cuda:<local_rank>` for CUDA, else `device`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"tensor parallel rank {local_rank} needs cuda:{local_rank}, but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", local_rank)
    return dev


def init_group(rank: int, world_size: int, device: torch.device, init_method: str,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the group (blocks until every rank has joined)."""
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed group already exists in this process: one "
            "tensor-parallel engine per process at a time (close the other first)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # eager NCCL init: no lazy init inside a graph capture
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            **kwargs)
    return TPGroup(rank, world_size, device, backend)

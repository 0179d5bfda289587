"""Check the device, dtype and size arguments of the runner and the KV cache.

Each check raises ValueError (TypeError for a value of the wrong type) naming
the argument and the allowed values, and runs before anything is allocated:
an impossible request fails at once instead of as a CUDA error or an
out-of-memory deep inside torch.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

import torch

__all__ = [
    "MAX_SLOTS",
    "SUPPORTED_DTYPES",
    "check_device",
    "check_dtype",
    "check_int",
    "check_kv_size",
    "check_slots",
    "device_memory",
]

#: Dtypes the model and KV cache run in.
SUPPORTED_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ALIASES = {"float": "float32", "half": "float16"}
#: KV slots are int32 (`page * page_size + offset`, as the native pool stores them).
MAX_SLOTS = 2**31 - 1


def check_int(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bool, float and str are refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)  # int and numpy integers
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def check_device(device: object, name: str = "device") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device of those) that exists here."""
    allowed = "'cpu', 'cuda' or 'cuda:N'"
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name} {device!r} is not a known device; use {allowed}") from None
    else:
        raise TypeError(f"{name} must be a str or torch.device, got {type(device).__name__}")
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{name} {str(device)!r} is not supported; use {allowed}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name} {str(device)!r}: CUDA is not available (torch {torch.__version__}); "
            "use 'cpu'"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{name} {str(device)!r}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return dev


def check_dtype(dtype: object, name: str = "dtype") -> torch.dtype | None:
    """None (the checkpoint's choice), or one of SUPPORTED_DTYPES by name or value."""
    if dtype is None:
        return None
    allowed = ", ".join(SUPPORTED_DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(f"{name} {dtype} is not supported; use one of {allowed}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"{name} must be a str or torch.dtype, got {type(dtype).__name__}")
    key = dtype.removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} {dtype!r} is not supported; use one of {allowed}")
    return SUPPORTED_DTYPES[key]


#: Where a container's memory limit lives (cgroup v2, then v1).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory(device: torch.device) -> int | None:
    """Total bytes of `device`: the GPU's memory, or for the CPU the physical
    RAM or the container's memory limit, whichever is smaller; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit
            sizes.append(int(text))
    return min(sizes, default=None)


def check_slots(num_pages: int, page_size: int) -> None:
    """Every slot id `page * page_size + offset` fits int32."""
    if num_pages * page_size > MAX_SLOTS:
        raise ValueError(
            f"num_pages * page_size = {num_pages} * {page_size} exceeds {MAX_SLOTS} "
            "KV slots (slot ids are int32); use fewer pages"
        )


def check_kv_size(num_pages: int, page_size: int, bytes_per_page: int,
                  device: torch.device) -> None:
    """The pool's slots fit int32 and its bytes fit the device's total memory."""
    check_slots(num_pages, page_size)
    total = device_memory(device)
    need = num_pages * bytes_per_page
    if total is not None and need > total:
        raise ValueError(
            f"num_pages {num_pages} needs {need / 2**30:.1f} GiB of KV cache "
            f"({bytes_per_page} bytes per page), more than the {total / 2**30:.1f} GiB "
            f"{device} has; at most {total // bytes_per_page} pages fit"
        )

"""Whether a Triton kernel family may run: Triton imports and its escape-hatch
environment variable (set to "0" to compare against the torch ops) is not off."""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=None)
def kernels_enabled(flag: str) -> bool:
    if os.environ.get(flag, "1") == "0":
        return False
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True

"""`check_runner_args`: ModelRunner's constructor arguments, checked before it loads.

A typo in `device`, `dtype`, `num_pages`, `page_size`, `attention` or
`kv_dtype` fails at once with a ValueError naming the argument and what is
allowed, instead of after the weights are loaded (or as a CUDA / out-of-memory error). Only
config.json is read, to size the KV pool an explicit `num_pages` asks for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dendrite.model.devices import check_device, check_dtype, check_int, check_kv_size, check_slots

__all__ = ["ATTENTION_BACKENDS", "check_runner_args"]

ATTENTION_BACKENDS = ("auto", "reference", "flashinfer")


def check_runner_args(
    model: object,
    device: object,
    dtype: object,
    num_pages: object,
    page_size: object,
    attention: object,
    kv_dtype: object = None,
) -> None:
    """Raise TypeError/ValueError naming the first bad argument; allocate nothing."""
    from dendrite.model.kv_cache import kv_format
    from dendrite.model.kv_quant_cache import page_bytes
    from dendrite.model.loader import LoadedModel, load_config, resolve_dtype

    if not isinstance(model, (str, Path, LoadedModel)):
        raise TypeError(
            f"model must be a model directory (str or Path) or a LoadedModel, "
            f"got {type(model).__name__}"
        )
    dev = check_device(device)
    dt = check_dtype(dtype)
    kv_fmt = kv_format(kv_dtype)
    page_size = check_int("page_size", page_size)
    # A non-str is taken as a ready backend, as make_backend does (a Protocol).
    if isinstance(attention, str) and attention not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention {attention!r} is not a backend; use one of "
            f"{', '.join(ATTENTION_BACKENDS)} or pass an AttentionBackend"
        )
    if kv_fmt.bits is not None and attention == "flashinfer":
        raise ValueError(f"kv_dtype={kv_fmt.name!r}: attention must be 'auto' or 'reference' "
                         "(FlashInfer cannot read N-bit pages), got 'flashinfer'")
    if num_pages is None:
        return  # sized after loading, from the memory left
    num_pages = check_int("num_pages", num_pages)
    check_slots(num_pages, page_size)
    if isinstance(model, LoadedModel):
        config, dev, dt = model.config, model.device, model.dtype
    else:
        config = load_config(model)
        dt = resolve_dtype(config, dev, dt)
    per_page = page_bytes(kv_fmt, config.num_layers, page_size, config.num_kv_heads,
                          config.head_dim, dt)
    check_kv_size(num_pages, page_size, per_page, torch.device(dev))

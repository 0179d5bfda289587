"""Which weight quantization a load uses: the `quantization` argument and the
checkpoint's own `quantization_config` (config.json), resolved into one `Scheme`.

`quantization`:

* None: as the checkpoint is. Dense checkpoints load dense; an FP8 checkpoint
  loads as FP8 (its own blocks and scales, no requantization).
* "none": dense weights in the model dtype; an FP8 checkpoint is dequantized.
* "fp8": block-scaled e4m3, 128 x 128 blocks, quantized at load from a dense
  checkpoint; an FP8 checkpoint keeps its own layout.
* "mxfp8": MXFP8 (1 x 32 blocks, e8m0 scales), quantized at load (an FP8
  checkpoint is dequantized to float32 first).

Pre-quantized checkpoints read (`quantization_config.quant_method`):

* "fp8" (HF FineGrainedFP8, DeepSeek-V3): `*.weight` float8_e4m3fn plus
  `*.weight_scale_inv` float32, the multiplier of each `weight_block_size`
  block ([ceil(N / rows), ceil(K / cols)]), or one per tensor without a block size.
* "compressed-tensors" with 8-bit float weights (`format` "float-quantized" or
  "naive-quantized"): `*.weight` float8_e4m3fn plus `*.weight_scale`,
  strategy "tensor" (one), "channel" ([N, 1]) or "block" (`block_structure`).
  Activation scales (`input_scale`) are ignored: activations stay in the model dtype.

Any other quant_method is a ModelLoadError naming it and the file. (The
model errors are imported where raised: dendrite.model's package imports
this module through its runner.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHOICES", "Scheme", "Source", "check_lm_head", "check_quantization", "read_source",
           "resolve"]

#: Values of the `quantization` argument (None: as the checkpoint is).
CHOICES = ("none", "fp8", "mxfp8")
#: quant_method values a checkpoint may have (model/config.py lets these through).
QUANT_METHODS = ("fp8", "compressed-tensors")


def check_quantization(value: object) -> str | None:
    """`value` if it is None or one of CHOICES, else a TypeError/ValueError naming it."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"quantization must be None or one of {', '.join(CHOICES)}, "
                        f"got {value!r} of type {type(value).__name__}")
    if value not in CHOICES:
        raise ValueError(f"quantization must be None or one of {', '.join(CHOICES)}, "
                         f"got {value!r}")
    return value


def check_lm_head(quantize_lm_head: object, quantization: str | None) -> bool:
    """`quantize_lm_head` if it is a bool that fits `quantization`: the output
    projection is quantized in the format the load quantizes to, so it needs
    quantization "fp8" or "mxfp8" (a TypeError/ValueError saying so)."""
    if not isinstance(quantize_lm_head, bool):
        raise TypeError(f"quantize_lm_head must be a bool, got {quantize_lm_head!r}")
    if quantize_lm_head and quantization not in ("fp8", "mxfp8"):
        raise ValueError(f"quantize_lm_head=True needs quantization='fp8' or 'mxfp8' (the "
                         f"format it takes), got quantization={quantization!r}")
    return quantize_lm_head


@dataclass(frozen=True)
class Source:
    """How a pre-quantized checkpoint stores its projection weights."""

    method: str  # "fp8" | "compressed-tensors"
    #: The scale tensor's suffix after the module name ("weight_scale_inv", "weight_scale").
    scale_suffix: str
    #: (rows, cols) of a scale block; None in a slot: the whole dimension
    #: (per-tensor: (None, None); per-channel: (1, None)).
    block: tuple[int | None, int | None]
    #: Module names (or name fragments) left unquantized by the checkpoint.
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scheme:
    """A load's projection weights: the stored `source` (None: dense) and the
    `target` format ("fp8", "mxfp8", or "none" for dense in the model dtype)."""

    target: str
    source: Source | None


def _block(value: Any, where: str) -> tuple[int, int]:
    from dendrite.model.errors import ModelLoadError

    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ModelLoadError(f"{where} must be two positive ints [rows, cols], got {value!r}")
    return int(value[0]), int(value[1])


def _fp8_source(qc: dict[str, Any], where: str) -> Source:
    from dendrite.model.errors import UnsupportedModelError

    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(f"{where}: fp8 fmt {fmt!r} is not supported (only e4m3)")
    size = qc.get("weight_block_size")
    block = (None, None) if size is None else _block(size, f"{where}: weight_block_size")
    skip = tuple(qc.get("modules_to_not_convert") or ())
    return Source("fp8", "weight_scale_inv", block, skip)


def _compressed_source(qc: dict[str, Any], where: str) -> Source:
    from dendrite.model.errors import UnsupportedModelError

    fmt = qc.get("format", "float-quantized")
    groups = qc.get("config_groups")
    if fmt not in ("float-quantized", "naive-quantized") or not isinstance(groups, dict) \
            or len(groups) != 1:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors format {fmt!r} with {len(groups or {})} config "
            "group(s) is not supported (only one group of 8-bit float weights, "
            "format float-quantized)")
    (group,) = groups.values()
    weights = (group or {}).get("weights") or {}
    if weights.get("num_bits") != 8 or weights.get("type") != "float":
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weights of {weights.get('num_bits')} bits, type "
            f"{weights.get('type')!r} are not supported (only 8-bit float, e4m3)")
    strategy = weights.get("strategy")
    if strategy == "tensor":
        block: tuple[int | None, int | None] = (None, None)
    elif strategy == "channel":
        block = (1, None)
    elif strategy == "block":
        block = _block(weights.get("block_structure"), f"{where}: block_structure")
    else:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weight strategy {strategy!r} is not supported "
            "(tensor, channel, block)")
    return Source("compressed-tensors", "weight_scale", block, tuple(qc.get("ignore") or ()))


def read_source(config: dict[str, Any], config_path: str | Path) -> Source | None:
    """The checkpoint's stored quantization from its config.json dict (None: dense)."""
    from dendrite.model.errors import ModelLoadError, UnsupportedModelError

    qc = config.get("quantization_config")
    if qc is None:
        return None
    where = f"{config_path}: quantization_config"
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{where} must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_source(qc, where)
    if method == "compressed-tensors":
        return _compressed_source(qc, where)
    raise UnsupportedModelError(
        f"{config_path}: quantized checkpoints (quant_method {method!r}) are not supported; "
        f"supported: {', '.join(QUANT_METHODS)} (8-bit float weights)")


def resolve(quantization: str | None, source: Source | None) -> Scheme | None:
    """The load's scheme; None: a dense checkpoint loaded dense (no quantization code)."""
    quantization = check_quantization(quantization)
    if source is None:
        if quantization in (None, "none"):
            return None
        return Scheme(quantization, None)
    return Scheme("fp8" if quantization is None else quantization, source)

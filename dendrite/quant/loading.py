"""Load the projection weights of a Llama-family checkpoint as FP8 / MXFP8.

Two steps around the loader's own (dendrite/model/loader.py):

1. `prepare(model, scheme, tensors)`, with the model still on the meta
   device: checks every projection weight's header (present, shape, dtype,
   scale tensor and its shape), takes those entries (and their scales) out of
   the tensors the loader copies, and swaps each fused projection (q|k|v,
   o, gate|up, down) for a `QuantLinear` of the scheme's format and scale
   layout. Nothing is read or allocated: a bad checkpoint fails first, naming
   the tensor and the file.
2. `load(model, plan, device, dtype)`, after the rest of the model is loaded:
   reads each projection's parts, quantizes a float part at load (on `device`,
   one part at a time), takes a stored e4m3 part with its scales as is (or
   dequantizes it, for "mxfp8" or "none"), and fuses the parts into the module.

A stored e4m3 weight and the same float weight quantized at load give the
same module contents when their blocks agree, since quantization is per
checkpoint tensor (per q, k, v ... projection) in both cases.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dendrite.model import checkpoint
from dendrite.model.checkpoint import TensorInfo
from dendrite.model.errors import ModelLoadError
from dendrite.quant.formats import (
    FP8_BLOCK,
    MX_BLOCK,
    QuantizedWeight,
    cat_rows,
    fused_block,
    quantize,
    quantize_fp8,
    quantize_mxfp8,
)
from dendrite.quant.linear import QuantLinear
from dendrite.quant.scheme import Scheme, Source

__all__ = ["QuantPlan", "load", "prepare", "quantize_lm_head"]

log = logging.getLogger(__name__)

#: Our fused module -> the HF modules it is made of, in row order.
PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
#: Activation-quantization tensors of a projection, unused (activations stay dense).
_ACTIVATION_SCALES = ("input_scale", "activation_scale")
_FP8_DTYPE = "F8_E4M3"


@dataclass
class _Part:
    """One checkpoint projection: its weight (and scale) entries."""

    name: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    weight: TensorInfo
    scale: TensorInfo | None  # set when the weight is stored in e4m3
    block: tuple[int, int] | None  # the stored scale block, when scale is set


@dataclass
class _Target:
    """One fused projection of the model and its checkpoint parts."""

    module: str  # e.g. model.layers.0.self_attn.qkv_proj
    parts: list[_Part]


@dataclass
class QuantPlan:
    """What `prepare` found, for `load`."""

    scheme: Scheme
    targets: list[_Target] = field(default_factory=list)

    @property
    def handled(self) -> frozenset[str]:
        """Checkpoint weight names `load` fills (the loader must not call them missing)."""
        return frozenset(f"{p.name}.weight" for t in self.targets for p in t.parts)


def _stored_block(source: Source, rows: int, cols: int) -> tuple[int, int]:
    """The block of a stored part of [rows, cols]: None slots are the whole dimension."""
    bn, bk = source.block
    return (rows if bn is None else bn, cols if bk is None else bk)


def _scale_shape_ok(info: TensorInfo, source: Source, rows: int, cols: int) -> bool:
    bn, bk = source.block
    if bn is None and bk is None:  # per tensor: a scalar, [1] or [1, 1]
        return all(s == 1 for s in info.shape)
    if bk is None:  # per channel: [N, 1] or [N]
        return info.shape in ((rows, 1), (rows,))
    return info.shape == (-(-rows // bn), -(-cols // bk))


def _part(name: str, tensors: dict[str, TensorInfo], source: Source | None,
          rows: int, cols: int, arch: str) -> _Part:
    """Check one HF projection's headers; raise ModelLoadError naming tensor and file."""
    winfo = tensors.get(f"{name}.weight")
    if winfo is None:
        files = sorted({i.file for i in tensors.values()})
        raise ModelLoadError(
            f"{arch} checkpoint lacks tensor {name}.weight; searched "
            f"{checkpoint.describe_files(files)} in {files[0].parent if files else '?'}")
    if winfo.shape != (rows, cols):
        raise ModelLoadError(
            f"{winfo.file}: checkpoint tensor {winfo.name} has shape {winfo.shape}, "
            f"expected {(rows, cols)} (from {arch} config)")
    if winfo.dtype in checkpoint.CASTABLE_DTYPES:
        return _Part(name, winfo, None, None)
    if winfo.dtype != _FP8_DTYPE or source is None:
        allowed = ", ".join(checkpoint.CASTABLE_DTYPES + ((_FP8_DTYPE,) if source else ()))
        hint = "" if source else " (an e4m3 weight needs a quantization_config in config.json)"
        raise ModelLoadError(
            f"{winfo.file}: tensor {winfo.name} has dtype {winfo.dtype}, which cannot be "
            f"loaded as a weight (supported: {allowed}){hint}")
    sname = f"{name}.{source.scale_suffix}"
    sinfo = tensors.get(sname)
    if sinfo is None:
        raise ModelLoadError(
            f"{winfo.file}: e4m3 tensor {winfo.name} has no scale tensor {sname} "
            f"({source.method} checkpoint)")
    if sinfo.dtype not in ("F32", "BF16", "F16") or not _scale_shape_ok(sinfo, source, rows, cols):
        raise ModelLoadError(
            f"{sinfo.file}: scale tensor {sname} has shape {sinfo.shape} and dtype "
            f"{sinfo.dtype}; expected float32 scales of blocks {source.block} "
            f"(None: the whole dimension) for a weight of {(rows, cols)}")
    return _Part(name, winfo, sinfo, _stored_block(source, rows, cols))


def _target_block(scheme: Scheme, parts: list[_Part]) -> tuple[tuple[int, int], bool]:
    """(the fused module's scale block, whether stored e4m3 parts are kept as they are)."""
    rows = [p.weight.shape[0] for p in parts]
    if scheme.target == "mxfp8":
        return (1, MX_BLOCK), False
    blocks = [p.block for p in parts]
    # Keep the checkpoint's e4m3 and scales when every part has them with the
    # same block columns; otherwise (a part stored dense, mixed blocks) all are
    # (re)quantized in 128 x 128 blocks.
    if all(b is not None for b in blocks) and len({b[1] for b in blocks}) == 1:  # type: ignore[index]
        return fused_block(rows, blocks), True  # type: ignore[arg-type]
    return fused_block(rows, [FP8_BLOCK] * len(parts)), False


def _projection_sizes(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """layer prefix -> HF part name -> (rows, cols), from the model's config."""
    cfg = model.config
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    sizes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
             "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
             "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
             "mlp.down_proj": (h, inter)}
    return {f"model.layers.{i}.": sizes for i in range(cfg.num_layers)}


def prepare(model: nn.Module, scheme: Scheme, tensors: dict[str, TensorInfo]
            ) -> tuple[dict[str, TensorInfo], QuantPlan]:
    """Check the projection headers, swap the modules (model on meta), and return
    the tensors left for the loader with the plan for `load`."""
    arch = model.config.architecture
    plan = QuantPlan(scheme)
    taken: set[str] = set()
    for prefix, sizes in _projection_sizes(model).items():
        for fused, hf_parts in PARTS.items():
            parts = [_part(prefix + p, tensors, scheme.source, *sizes[p], arch) for p in hf_parts]
            plan.targets.append(_Target(prefix + fused, parts))
            for p in parts:
                taken.add(p.weight.name)
                if p.scale is not None:
                    taken.add(p.scale.name)
                taken.update(f"{p.name}.{s}" for s in _ACTIVATION_SCALES)
            if scheme.target == "none":
                continue
            old = model.get_submodule(prefix + fused)
            if not isinstance(old, nn.Linear):
                raise ModelLoadError(f"cannot quantize {prefix + fused}: it is a "
                                     f"{type(old).__name__}, not an nn.Linear")
            block, _ = _target_block(scheme, parts)
            with torch.device("meta"):  # allocated by the loader's to_empty
                new = QuantLinear(old.in_features, old.out_features, old.bias is not None,
                                  block, mx=scheme.target == "mxfp8")
            parent_name, _, child = (prefix + fused).rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    rest = {k: v for k, v in tensors.items() if k not in taken}
    return rest, plan


def _read(infos: list[TensorInfo]) -> Iterator[torch.Tensor]:
    for _, t in checkpoint.read_tensors(infos):
        yield t


def _stored(part: _Part, device: torch.device) -> QuantizedWeight:
    """A stored e4m3 part with its scales, on `device`, as a QuantizedWeight."""
    data, scale = _read([part.weight, part.scale])  # type: ignore[list-item]
    rows, cols = part.weight.shape
    bn, bk = part.block  # type: ignore[misc]
    grid = (-(-rows // bn), -(-cols // bk))
    scale = scale.to(device=device, dtype=torch.float32).reshape(grid).contiguous()
    return QuantizedWeight(data.to(device).contiguous(), scale, (bn, bk))


def _fuse(target: _Target, scheme: Scheme, device: torch.device) -> QuantizedWeight:
    """The fused projection in the scheme's format, from its checkpoint parts."""
    _, keep = _target_block(scheme, target.parts)
    qs = []
    for p in target.parts:
        if keep:
            qs.append(_stored(p, device))
            continue
        if p.scale is not None:
            w = _stored(p, device).dequantize(torch.float32)
        else:
            (w,) = _read([p.weight])
            w = w.to(device)
        qs.append(quantize_mxfp8(w) if scheme.target == "mxfp8"
                  else quantize_fp8(w, FP8_BLOCK, search=True))
        del w
    return cat_rows(qs)


def load(model: nn.Module, plan: QuantPlan, device: torch.device | str,
         dtype: torch.dtype) -> None:
    """Fill the planned projections (the rest of the model is loaded)."""
    device = torch.device(device)
    with torch.no_grad():
        for target in plan.targets:
            if plan.scheme.target == "none":  # dense: dequantize the stored parts
                for p in target.parts:
                    if p.scale is not None:
                        w = _stored(p, device).dequantize(dtype)
                    else:
                        (w,) = _read([p.weight])
                    model.load_hf_weight(f"{p.name}.weight", w)
                continue
            module = model.get_submodule(target.module)
            try:
                module.set_weight(_fuse(target, plan.scheme, device))
            except ValueError as e:  # a stored weight with NaN / inf, say
                files = ", ".join(sorted({Path(p.weight.file).name for p in target.parts}))
                raise ModelLoadError(f"{files}: cannot quantize {target.module}: {e}") from None


def quantize_lm_head(model: nn.Module, fmt: str, device: torch.device | str) -> None:
    """Replace the output projection by a QuantLinear of format `fmt` quantized
    from the loaded dense weight (the embedding table when tied, which stays
    dense for the token lookup: decode reads the head for every token, the
    table one row)."""
    dense = model.lm_head_weight
    with torch.no_grad():
        q = quantize(dense.to(device=device, dtype=torch.float32), fmt)
    head = QuantLinear(dense.shape[1], dense.shape[0], False, q.block, fmt == "mxfp8")
    head = head.to(device)
    head.set_weight(q)
    model.lm_head = head.requires_grad_(False)

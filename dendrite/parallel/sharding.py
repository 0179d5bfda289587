"""Tensor-parallel sharding: each rank's slice of a Llama-family checkpoint.

Megatron-style splits over `tp` ranks, rank `r` holding:

* q/k/v projections (column parallel): heads `[r*Hq/tp, (r+1)*Hq/tp)` of q
  and `[r*Hkv/tp, (r+1)*Hkv/tp)` of k and v, so attention is local to a rank
  and each rank's KV pool holds its own `Hkv/tp` heads of every page;
* o_proj (row parallel): the matching input columns; its output is a partial
  sum that `DecoderLayer.all_reduce` adds up over the ranks;
* gate/up (column parallel): rows `[r*I/tp, (r+1)*I/tp)` of each, so SiLU*up
  is local; down_proj (row parallel): the matching columns, all-reduced.
* The embedding, the norms, q/k norms and lm_head are replicated (the
  simplest choice: every rank computes the same full logits; only rank 0
  samples). Row-parallel biases (o_proj, down_proj) are kept on rank 0 and
  zeroed on the others, so the all-reduce adds them once.

A rank reads only its slices from the safetensors files (`get_slice`), never
a whole sharded tensor. The sharded model is an ordinary `LlamaForCausalLM`
built from `local_config` (the per-rank head and intermediate counts), so
the attention backends, the KV pool and the CUDA graphs see a smaller model.
"""

from __future__ import annotations

import operator
import re
from dataclasses import replace
from pathlib import Path

import torch

from dendrite.model import checkpoint
from dendrite.model.config import ModelConfig
from dendrite.model.devices import check_device, check_dtype
from dendrite.model.errors import ModelLoadError
from dendrite.model.llama import LlamaForCausalLM
from dendrite.model.loader import (
    LoadedModel,
    load_config,
    load_generation_config,
    load_tokenizer,
    resolve_dtype,
)

__all__ = ["check_tensor_parallel", "load_shard", "local_config", "random_shard", "shard_slice"]

_LAYER = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_tensor_parallel(tp: object, config: ModelConfig | None = None) -> int:
    """`tp` as an int >= 1 that divides the model's heads, KV heads and MLP width.

    TypeError for a non-int, ValueError naming the argument and the sizes
    that would work otherwise."""
    if isinstance(tp, bool):
        raise TypeError(f"tensor_parallel must be an int, got {tp!r}")
    try:
        n = operator.index(tp)
    except TypeError:
        raise TypeError(
            f"tensor_parallel must be an int, got {type(tp).__name__} {tp!r}") from None
    if n < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {n}")
    if config is None or n == 1:
        return n
    sizes = {"num_attention_heads": config.num_heads,
             "num_key_value_heads": config.num_kv_heads,
             "intermediate_size": config.intermediate_size}
    bad = [f"{k} {v}" for k, v in sizes.items() if v % n]
    if bad:
        ok = [d for d in range(1, config.num_kv_heads + 1)
              if all(v % d == 0 for v in sizes.values())]
        raise ValueError(
            f"tensor_parallel {n} does not divide the model's {', '.join(bad)}; "
            f"allowed: {', '.join(map(str, ok))}")
    return n


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank shape: heads, KV heads and MLP width divided by `tp`."""
    tp = check_tensor_parallel(tp, config)
    return replace(config, num_heads=config.num_heads // tp,
                   num_kv_heads=config.num_kv_heads // tp,
                   intermediate_size=config.intermediate_size // tp)


def shard_slice(name: str, config: ModelConfig, rank: int,
                tp: int) -> tuple[int, int, int] | None:
    """`(dim, start, length)` of checkpoint tensor `name` (HF spelling) that
    rank `rank` holds, or None when every rank holds all of it."""
    m = _LAYER.match(name)
    if m is None or tp == 1:
        return None
    block, proj, kind = m.groups()
    d = config.head_dim
    if block == "self_attn":
        if proj in ("q", "k", "v"):
            heads = config.num_heads if proj == "q" else config.num_kv_heads
            n = heads // tp * d
            return 0, rank * n, n
        if proj == "o" and kind == "weight":
            n = config.num_heads // tp * d
            return 1, rank * n, n
        return None
    n = config.intermediate_size // tp
    if proj in ("gate", "up"):
        return 0, rank * n, n
    if proj == "down" and kind == "weight":
        return 1, rank * n, n
    return None


def _row_parallel_bias(name: str) -> bool:
    m = _LAYER.match(name)
    return m is not None and m.group(2) in ("o", "down") and m.group(3) == "bias"


def _read_slice(f, name: str, spec: tuple[int, int, int] | None) -> torch.Tensor:
    """The rank's part of one tensor, read through safetensors' lazy slice."""
    if spec is None:
        return f.get_tensor(name)
    dim, start, length = spec
    s = f.get_slice(name)
    if dim == 0:
        return s[start:start + length]
    return s[:, start:start + length]


def load_shard(model_dir: str | Path, rank: int, tp: int,
               device: torch.device | str = "cpu",
               dtype: torch.dtype | str | None = None) -> LoadedModel:
    """Rank `rank`'s shard of a model directory as a `LoadedModel` whose
    `config` is the per-rank `local_config` (full vocabulary, hidden size and
    layer count). Missing or misshapen tensors raise ModelLoadError naming
    them before any weight memory is allocated."""
    dev = check_device(device)
    check_dtype(dtype)
    d = Path(model_dir)
    config = load_config(d)
    tp = check_tensor_parallel(tp, config)
    if not 0 <= rank < tp:
        raise ValueError(f"rank must be in [0, {tp}), got {rank}")
    tokenizer = load_tokenizer(d, config)
    local = local_config(config, tp)
    dt = resolve_dtype(config, dev, dtype)
    files = checkpoint.weight_files(d)
    tensors = checkpoint.scan(d, files)
    with torch.device("meta"):
        model = LlamaForCausalLM(local)
    needed = model.hf_parameter_names()
    plan: list[tuple[checkpoint.TensorInfo, tuple[int, int, int] | None]] = []
    for name, info in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES) or name not in needed:
            continue  # (unknown tensors are the full loader's to report)
        spec = shard_slice(name, config, rank, tp)
        shape = list(info.shape)
        if spec is not None:
            dim, _, length = spec
            if dim >= len(shape) or shape[dim] != length * tp:
                raise ModelLoadError(
                    f"{info.file}: tensor {name} has shape {tuple(info.shape)}, which "
                    f"tensor_parallel {tp} cannot split into {tp} x {length} along dim {dim}")
            shape[dim] = length
        if info.dtype not in checkpoint.CASTABLE_DTYPES:
            raise ModelLoadError(
                f"{info.file}: tensor {name} has dtype {info.dtype}, which cannot be cast to "
                f"model weights (supported: {', '.join(checkpoint.CASTABLE_DTYPES)})")
        try:
            model.load_hf_weight(name, torch.empty(shape, device="meta"))
        except ValueError as e:
            raise ModelLoadError(f"{info.file}: {e} (rank {rank} of {tp})") from None
        plan.append((info, spec))
    missing = sorted(needed - {info.name for info, _ in plan})
    if missing:
        raise ModelLoadError(
            f"{config.architecture} checkpoint lacks {len(missing)} tensor(s): "
            f"{', '.join(missing[:8])}; searched {checkpoint.describe_files(files)} in {d}")
    model = model.to_empty(device=dev).to(dt)
    model.reset_buffers()
    by_file: dict[Path, list[tuple[checkpoint.TensorInfo, tuple | None]]] = {}
    for info, spec in plan:
        by_file.setdefault(info.file, []).append((info, spec))
    from safetensors import safe_open

    for path, group in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for info, spec in group:
                tensor = _read_slice(f, info.name, spec)
                if rank > 0 and _row_parallel_bias(info.name):
                    tensor = torch.zeros_like(tensor)  # added once, by rank 0
                model.load_hf_weight(info.name, tensor)
    model = model.eval().requires_grad_(False)
    return LoadedModel(d, local, model, tokenizer, load_generation_config(d))


def random_shard(model_dir: str | Path, rank: int, tp: int,
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = None, seed: int = 0) -> LoadedModel:
    """Rank `rank`'s shard of the model `model_dir`'s config.json describes, with
    random weights made on `device` (no weight file is read: benchmarks of
    large shapes skip writing and reading tens of GB). Replicated tensors are
    the same on every rank; projections are N(0, 0.02), norms 1, biases 0."""
    dev = check_device(device)
    check_dtype(dtype)
    d = Path(model_dir)
    config = load_config(d)
    tp = check_tensor_parallel(tp, config)
    local = local_config(config, tp)
    dt = resolve_dtype(config, dev, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(local)
    model = model.to_empty(device=dev).to(dt)
    model.reset_buffers()
    shared = torch.Generator(device=dev).manual_seed(seed)
    own = torch.Generator(device=dev).manual_seed(seed + 1 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                replicated = "embed_tokens" in name or name.startswith("lm_head")
                p.normal_(0.0, 0.02, generator=shared if replicated else own)
    model = model.eval().requires_grad_(False)
    return LoadedModel(d, local, model, load_tokenizer(d, config), load_generation_config(d))

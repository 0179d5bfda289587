"""Load a local HuggingFace-format model directory.

Reads config.json, the safetensors weights (one file, or shards listed in
model.safetensors.index.json), tokenizer.json / tokenizer_config.json and
generation_config.json.

A directory that cannot be loaded raises `ModelLoadError` (a ValueError) with
one line naming the file and, where there is one, the tensor or key. The
checks that need only headers (config values, missing or misshapen tensors,
uncastable dtypes, a tokenizer larger than the embedding) all run before any
weight memory is allocated.

    loaded = load("path/to/model", device="cuda")
    loaded.model, loaded.config, loaded.tokenizer, loaded.generation_config
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dendrite.model import checkpoint
from dendrite.model.checkpoint import INDEX_FILE, TensorInfo
from dendrite.model.config import ModelConfig, read_token_ids
from dendrite.model.devices import check_device, check_dtype
from dendrite.model.errors import MissingFileError, ModelLoadError, UnsupportedModelError
from dendrite.model.jsonfile import read_json_object
from dendrite.model.llama import LlamaForCausalLM
from dendrite.model.tokenizer import Tokenizer

__all__ = [
    "INDEX_FILE",
    "LoadedModel",
    "MissingFileError",
    "ModelLoadError",
    "UnsupportedModelError",
    "iter_weights",
    "load",
    "load_config",
    "load_generation_config",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "weight_files",
]

log = logging.getLogger(__name__)

# Checkpoint entries that are derived, not learned; older exports carry them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_dir(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if not d.exists():
        raise MissingFileError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise ModelLoadError(f"model directory {d} is not a directory")
    return d


def load_config(model_dir: str | Path) -> ModelConfig:
    """Parse and check config.json (eos ids merged with generation_config.json's)."""
    d = _model_dir(model_dir)
    path = d / "config.json"
    if not path.exists():
        raise MissingFileError(f"missing {path}: {d} is not a HuggingFace model directory")
    cfg = ModelConfig.from_hf(read_json_object(path), source=str(path))
    gen_path = d / "generation_config.json"
    gen = read_json_object(gen_path, optional=True)
    eos = read_token_ids(gen, "eos_token_id", cfg.vocab_size, str(gen_path))
    merged = tuple(dict.fromkeys([*eos, *cfg.eos_token_ids]))
    bos = read_token_ids(gen, "bos_token_id", cfg.vocab_size, str(gen_path))
    return replace(cfg, eos_token_ids=merged, bos_token_id=bos[0] if bos else cfg.bos_token_id)


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent: it is optional)."""
    return read_json_object(Path(model_dir) / "generation_config.json", optional=True)


def load_tokenizer(model_dir: str | Path, config: ModelConfig | None = None) -> Tokenizer:
    """tokenizer.json & co.; its ids must fit the model's embedding (config.vocab_size)."""
    d = _model_dir(model_dir)
    config = config or load_config(d)
    tok = Tokenizer(d, eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id)
    if tok.num_ids > config.vocab_size:
        raise ModelLoadError(
            f"{d / 'tokenizer.json'} has token ids up to {tok.num_ids - 1} "
            f"({tok.num_ids} ids) but {d / 'config.json'} has vocab_size {config.vocab_size}: "
            "the tokenizer does not belong to this model"
        )
    return tok


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding the weights, checked to exist."""
    return checkpoint.weight_files(_model_dir(model_dir))


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every weight file, memory-mapped."""
    d = _model_dir(model_dir)
    infos = checkpoint.scan(d, checkpoint.weight_files(d)).values()
    for info, tensor in checkpoint.read_tensors(infos):
        yield info.name, tensor


def resolve_dtype(
    config: ModelConfig, device: torch.device | str, dtype: torch.dtype | str | None = None
) -> torch.dtype:
    """The dtype to run in: explicit `dtype`, else the checkpoint's on an
    accelerator; on the CPU, half-precision checkpoints run in float32
    (CPU half matmuls are slow and fp16 ones lossy). A `dtype` or `device`
    that is not supported raises ValueError naming the argument."""
    dt = check_dtype(dtype)
    if dt is not None:
        return dt
    if check_device(device).type == "cpu" and config.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return config.dtype


def _plan(
    model: LlamaForCausalLM,
    config: ModelConfig,
    tensors: dict[str, TensorInfo],
    files: list[Path],
    handled: frozenset[str] = frozenset(),
) -> list[TensorInfo]:
    """The checkpoint tensors to copy into `model` (still on the meta device).

    Each is tried against its slot with a meta tensor of its header shape, so
    the model's own shape check runs without reading or allocating anything.
    Raises ModelLoadError for a wrong shape or dtype (naming tensor and file)
    and for missing tensors (naming them and the files searched); unknown
    tensors are only logged, as transformers does. `handled`: names another
    reader fills (dendrite.quant.loading), not missing."""
    needed = model.hf_parameter_names()
    plan: list[TensorInfo] = []
    unexpected: list[str] = []
    for name, info in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head (transformers ignores it too)
        probe = torch.empty(info.shape, dtype=torch.float32, device="meta")
        try:
            known = model.load_hf_weight(name, probe)
        except AttributeError:  # e.g. a bias or layer this config does not have
            known = False
        except ValueError as e:  # the model's shape check
            raise ModelLoadError(f"{info.file}: {e} (from {config.architecture} config)") from None
        if not known:
            unexpected.append(name)
            continue
        if info.dtype not in checkpoint.CASTABLE_DTYPES:
            raise ModelLoadError(
                f"{info.file}: tensor {name} has dtype {info.dtype}, which cannot be cast to "
                f"model weights (supported: {', '.join(checkpoint.CASTABLE_DTYPES)})"
            )
        plan.append(info)
    missing = sorted(needed - {i.name for i in plan} - handled)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise ModelLoadError(
            f"{config.architecture} checkpoint lacks {len(missing)} tensor(s): {shown}; "
            f"searched {checkpoint.describe_files(files)} in {files[0].parent}"
        )
    if unexpected:
        log.warning(
            "ignoring %d unexpected checkpoint tensor(s) in %s: %s%s",
            len(unexpected),
            files[0].parent,
            ", ".join(unexpected[:8]),
            " ..." if len(unexpected) > 8 else "",
        )
    return plan


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    config: ModelConfig | None = None,
    quantization: str | None = None,
    quantize_lm_head: bool = False,
) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and fill it from the checkpoint.

    `quantization` (None, "none", "fp8", "mxfp8"): how the attention and MLP
    projections are stored (dendrite/quant/scheme.py); None: as the checkpoint is.
    `quantize_lm_head`: the output projection too, in the projections' format
    (a tied embedding keeps its dense table for the lookup)."""
    # (Imported here: dendrite.quant imports dendrite.model's modules.)
    from dendrite.quant import loading as quant_loading
    from dendrite.quant import scheme as quant_scheme

    check_device(device)
    check_dtype(dtype)
    quant_scheme.check_quantization(quantization)
    d = _model_dir(model_dir)
    config = config or load_config(d)
    quant_scheme.check_lm_head(quantize_lm_head, quantization)
    dtype = resolve_dtype(config, device, dtype)
    files = checkpoint.weight_files(d)
    tensors = checkpoint.scan(d, files)
    # Build on the meta device, check every tensor against it, then allocate
    # once: a bad checkpoint costs no memory and there is no wasted random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # FP8 / MXFP8 projections: checked and swapped for QuantLinear on meta;
    # their tensors are read by dendrite.quant.loading, not by `_plan`'s copy.
    scheme = quant_scheme.resolve(
        quantization, quant_scheme.read_source(read_json_object(d / "config.json"),
                                               d / "config.json"))
    quant_plan = None
    if scheme is not None:
        tensors, quant_plan = quant_loading.prepare(model, scheme, tensors)
    plan = _plan(model, config, tensors, files,
                 quant_plan.handled if quant_plan is not None else frozenset())
    # The dtype first, on meta: allocating float32 and then casting peaked at
    # three times a bf16 model's bytes (an 8B-class load OOM'd beside another).
    model = model.to(dtype).to_empty(device=device)
    model.reset_buffers()
    for info, tensor in checkpoint.read_tensors(plan):
        model.load_hf_weight(info.name, tensor)
    if quant_plan is not None:
        quant_loading.load(model, quant_plan, device, dtype)
    if quantize_lm_head:
        quant_loading.quantize_lm_head(model, quantization, device)
    return model.eval().requires_grad_(False)


@dataclass
class LoadedModel:
    """Everything a runner needs from one model directory."""

    path: Path
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device the weights live on."""
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.model.model.norm.weight.dtype


def load(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    quantize_lm_head: bool = False,
) -> LoadedModel:
    """Config, tokenizer and weights of a local HF model directory
    (`quantization`, `quantize_lm_head`: see `load_model`)."""
    from dendrite.quant.scheme import check_lm_head, check_quantization

    check_device(device)  # argument errors before reading anything
    check_dtype(dtype)
    check_quantization(quantization)
    check_lm_head(quantize_lm_head, quantization)
    d = _model_dir(model_dir)
    config = load_config(d)
    tokenizer = load_tokenizer(d, config)  # cheap; fail before the weights
    model = load_model(d, device, dtype, config, quantization, quantize_lm_head)
    return LoadedModel(d, config, model, tokenizer, load_generation_config(d))

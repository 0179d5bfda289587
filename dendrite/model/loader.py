"""Load a local HuggingFace-format model directory.

Reads config.json, the safetensors weights (one file, or shards listed in
model.safetensors.index.json), tokenizer.json / tokenizer_config.json and
generation_config.json. Every failure names the file or the architecture.

    loaded = load("path/to/model", device="cuda")
    loaded.model, loaded.config, loaded.tokenizer, loaded.generation_config
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dendrite.model.config import (
    MissingFileError,
    ModelConfig,
    ModelLoadError,
    UnsupportedModelError,
    parse_dtype,
)
from dendrite.model.llama import LlamaForCausalLM
from dendrite.model.tokenizer import Tokenizer

__all__ = [
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

INDEX_FILE = "model.safetensors.index.json"
# Checkpoint entries that are derived, not learned; older exports carry them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_dir(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise MissingFileError(f"model directory {d} does not exist")
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_config(model_dir: str | Path) -> ModelConfig:
    """Parse config.json (eos ids merged with generation_config.json's)."""
    d = _model_dir(model_dir)
    path = d / "config.json"
    if not path.is_file():
        raise MissingFileError(f"missing {path}")
    cfg = ModelConfig.from_hf(_read_json(path))
    gen = load_generation_config(d)
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    merged = tuple(dict.fromkeys([*eos, *cfg.eos_token_ids]))
    bos = gen.get("bos_token_id", cfg.bos_token_id)
    return replace(cfg, eos_token_ids=merged, bos_token_id=bos)


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent: it is optional)."""
    path = Path(model_dir) / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def load_tokenizer(model_dir: str | Path, config: ModelConfig | None = None) -> Tokenizer:
    d = _model_dir(model_dir)
    config = config or load_config(d)
    return Tokenizer(d, eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding the weights, checked to exist."""
    d = _model_dir(model_dir)
    index = d / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        other = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
        raise MissingFileError(f"no *.safetensors weights in {d}{hint}")
    return files


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every weight file, memory-mapped."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)


def resolve_dtype(
    config: ModelConfig, device: torch.device | str, dtype: torch.dtype | str | None = None
) -> torch.dtype:
    """The dtype to run in: explicit `dtype`, else the checkpoint's on an
    accelerator; on the CPU, half-precision checkpoints run in float32
    (CPU half matmuls are slow and fp16 ones lossy)."""
    dt = parse_dtype(dtype)
    if dt is not None:
        return dt
    if torch.device(device).type == "cpu" and config.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return config.dtype


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    config: ModelConfig | None = None,
) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and fill it from the checkpoint."""
    d = _model_dir(model_dir)
    config = config or load_config(d)
    dtype = resolve_dtype(config, device, dtype)
    files = weight_files(d)  # fail on missing files before allocating anything
    # Build on the meta device, then allocate once: no wasted random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.reset_buffers()

    needed = model.hf_parameter_names()
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_weights(d):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head (transformers ignores it too)
        if model.load_hf_weight(name, tensor):
            seen.add(name)
        else:
            unexpected.append(name)
    missing = sorted(needed - seen)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise ModelLoadError(
            f"{config.architecture} checkpoint in {d} ({len(files)} file(s)) "
            f"lacks {len(missing)} tensor(s): {shown}"
        )
    if unexpected:
        log.warning(
            "ignoring %d unexpected checkpoint tensor(s): %s",
            len(unexpected),
            ", ".join(unexpected[:8]),
        )
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
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype


def load(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Config, tokenizer and weights of a local HF model directory."""
    d = _model_dir(model_dir)
    config = load_config(d)
    tokenizer = load_tokenizer(d, config)  # cheap; fail before the weights
    model = load_model(d, device, dtype, config)
    return LoadedModel(d, config, model, tokenizer, load_generation_config(d))

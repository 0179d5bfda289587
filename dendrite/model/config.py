"""`ModelConfig`: the few numbers the model math needs, read from HF config.json.

One config shape covers Llama, Mistral, Qwen2 and Qwen3; the family only
decides which HF keys turn on biases, q/k norms and sliding windows. Both the
classic config.json keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5's (`rope_parameters`, `dtype`) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "MissingFileError",
    "ModelConfig",
    "ModelLoadError",
    "UnsupportedModelError",
    "parse_dtype",
]


class ModelLoadError(Exception):
    """A model directory that Dendrite cannot load."""


class MissingFileError(ModelLoadError, FileNotFoundError):
    """A file the model directory needs is absent."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """An architecture, activation or RoPE variant Dendrite does not implement."""


#: HF `architectures[0]` -> family; `model_type` is the fallback key.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'torch.float16' / torch.float32 -> torch dtype (None passes through)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise UnsupportedModelError(
            f"unsupported dtype {name!r}; use one of float32, float16, bfloat16"
        )
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 when attention_bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    dtype: torch.dtype = torch.float32  # checkpoint dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dict; raise UnsupportedModelError naming what is unsupported."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        family = SUPPORTED_ARCHITECTURES.get(arch) if arch else None
        if family is None and arch is None:
            family = {v: v for v in SUPPORTED_ARCHITECTURES.values()}.get(cfg.get("model_type"))
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {arch or cfg.get('model_type')!r} "
                f"(model_type={cfg.get('model_type')!r}); Dendrite supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = arch or next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == family)

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{arch}: unsupported hidden_act {act!r} (only 'silu')")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(cfg["num_hidden_layers"])
        theta, scaling = _rope(cfg, arch)

        bias = bool(cfg.get("attention_bias", False))
        if family == "qwen2":
            qkv_bias, o_bias = True, False
        elif family == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bias

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            family=family,
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            sliding_windows=_sliding_windows(cfg, family, layers),
            dtype=parse_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=dict(cfg),
        )


def _rope(cfg: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"{arch}: unsupported rope_scaling type {kind!r} (supported: {', '.join(_ROPE_TYPES)})"
        )
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError(f"{arch}: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    if kind == "llama3":
        params.setdefault(
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192)
        )
    return theta, params


def _sliding_windows(cfg: dict[str, Any], family: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer window, mirroring transformers: Mistral windows every layer when
    `sliding_window` is set; Qwen2/3 only with `use_sliding_window`, on the
    layers `layer_types` (or `max_window_layers`) marks as sliding."""
    window = cfg.get("sliding_window")
    if family == "mistral":
        return (int(window) if window else None,) * layers
    if family in ("qwen2", "qwen3") and window and cfg.get("use_sliding_window", False):
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
            for i in range(layers)
        ]
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (None,) * layers

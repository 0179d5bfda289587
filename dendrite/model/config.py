"""`ModelConfig`: the few numbers the model math needs, read from HF config.json.

One config shape covers Llama, Mistral, Qwen2 and Qwen3; the family only
decides which HF keys turn on biases, q/k norms and sliding windows. Both the
classic config.json keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5's (`rope_parameters`, `dtype`) are accepted.

`ModelConfig.from_hf` checks every value it reads (required keys present,
sizes positive integers, heads dividing the hidden size, ...) and raises a
`ModelLoadError` naming the file and the key, so a wrong config fails here and
not as a shape error deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dendrite.model.errors import MissingFileError, ModelLoadError, UnsupportedModelError

__all__ = [
    "REQUIRED_KEYS",
    "SUPPORTED_ARCHITECTURES",
    "MissingFileError",
    "ModelConfig",
    "ModelLoadError",
    "UnsupportedModelError",
    "parse_dtype",
    "read_token_ids",
]


#: HF `architectures[0]` -> family; `model_type` is the fallback key.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ROPE_TYPES = ("default", "linear", "llama3")
#: quantization_config.quant_method values let through (dendrite.quant.scheme.QUANT_METHODS).
_QUANT_METHODS = ("fp8", "compressed-tensors")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


#: config.json keys without which there is no model to build.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_LAYER_TYPES = ("full_attention", "sliding_attention")


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


class _Reader:
    """Typed access to a config dict; every failure names `source` and the key."""

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.cfg, self.source = cfg, source

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {what}")

    def int(self, key: str, default: int | None = None, low: int = 1) -> int:
        v = self.cfg.get(key)
        if v is None:
            if default is None:
                raise self.fail(f"missing required key {key!r}")
            return default
        # JSON has one number type: 4096.0 is 4096, but 0.5 or "64" is a mistake.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise self.fail(f"{key} must be an integer, got {v!r}")
        if v < low:
            raise self.fail(f"{key} must be >= {low}, got {v!r}")
        return int(v)

    def positive_float(self, key: str, default: float) -> float:
        v = self.cfg.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            math.isfinite(v) and v > 0
        ):
            raise self.fail(f"{key} must be a positive number, got {v!r}")
        return float(v)

    def token_id(self, key: str, vocab: int) -> tuple[int, ...]:
        return read_token_ids(self.cfg, key, vocab, self.source)


def read_token_ids(cfg: dict[str, Any], key: str, vocab_size: int, source: str) -> tuple[int, ...]:
    """`cfg[key]` (bos/eos: null, one id or a list) as ids, each in [0, vocab_size);
    else ModelLoadError naming `source` and `key`."""
    v = cfg.get(key)
    ids = [] if v is None else v if isinstance(v, list) else [v]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ModelLoadError(
                f"{source}: {key} {v!r} is not a token id in [0, vocab_size={vocab_size})"
            )
    return tuple(ids)


def _family(r: _Reader) -> tuple[str, str]:
    """(family, architecture) of the config, or UnsupportedModelError listing the supported."""
    cfg = r.cfg
    supported = ", ".join(f"{a} ({f})" for a, f in SUPPORTED_ARCHITECTURES.items())
    archs = cfg.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise r.fail(f"architectures must be a list of names, got {archs!r}")
    arch = archs[0] if archs else None
    model_type = cfg.get("model_type")
    if arch is not None:
        family = SUPPORTED_ARCHITECTURES.get(arch)
    else:
        family = {f: f for f in SUPPORTED_ARCHITECTURES.values()}.get(model_type)
    if family is None:
        what = (
            f"unsupported architecture {arch or model_type!r} (model_type={model_type!r})"
            if arch or model_type
            else "names no architecture (no 'architectures' and no 'model_type')"
        )
        raise UnsupportedModelError(f"{r.source}: {what}; Dendrite supports {supported}")
    arch = arch or next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == family)
    return family, arch


@dataclass(frozen=True)
class ModelConfig:
    """The model hyper-parameters Dendrite uses, read from a model directory's config.json."""
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
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse and check a config.json dict.

        Raises UnsupportedModelError naming what Dendrite does not implement and
        ModelLoadError naming a missing or bad key; `source` (the file) starts
        every message."""
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        r = _Reader(cfg, source)
        family, arch = _family(r)
        missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
        if missing:
            raise r.fail(f"missing required key(s) {', '.join(missing)}")
        qc = cfg.get("quantization_config")
        method = (qc if isinstance(qc, dict) else {}).get("quant_method", "?")
        # FP8 weights are read by dendrite/quant/scheme.py, which checks the rest.
        if qc is not None and method not in _QUANT_METHODS:
            raise UnsupportedModelError(
                f"{source}: quantized checkpoints (quant_method {method!r}) are not supported"
            )

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(
                f"{source}: {arch}: unsupported hidden_act {act!r} (only 'silu')"
            )
        vocab, hidden = r.int("vocab_size"), r.int("hidden_size")
        heads, layers = r.int("num_attention_heads"), r.int("num_hidden_layers")
        kv_heads = r.int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise r.fail(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        if cfg.get("head_dim") is None and hidden % heads:
            raise r.fail(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                "(and no head_dim is given)"
            )
        head_dim = r.int("head_dim", default=hidden // heads)
        if head_dim % 2:
            raise r.fail(f"head_dim {head_dim} must be even (RoPE rotates pairs)")
        theta, scaling = _rope(r, arch)

        bias = bool(cfg.get("attention_bias", False))
        if family == "qwen2":
            qkv_bias, o_bias = True, False
        elif family == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bias

        dtype_key = "torch_dtype" if cfg.get("torch_dtype") else "dtype"
        try:
            dtype = parse_dtype(cfg.get(dtype_key) or "float32")
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{source}: {dtype_key}: {e}") from None
        return cls(
            family=family,
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=r.int("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.positive_float("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=r.int("max_position_embeddings", default=4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            sliding_windows=_sliding_windows(r, family, layers),
            dtype=dtype,
            bos_token_id=(r.token_id("bos_token_id", vocab) or (None,))[0],
            eos_token_ids=r.token_id("eos_token_id", vocab),
            raw=dict(cfg),
        )


def _rope(r: _Reader, arch: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
    cfg = r.cfg
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise r.fail(f"{key} must be an object, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    theta = _Reader({"rope_theta": theta}, r.source).positive_float("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"{r.source}: {arch}: unsupported rope_scaling type {kind!r} "
            f"(supported: {', '.join(_ROPE_TYPES)})"
        )
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError(f"{r.source}: {arch}: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    if kind == "llama3":
        params.setdefault(
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192)
        )
    # The numbers rope_inv_freq divides by: check them here, not as a KeyError there.
    sub = _Reader(params, f"{r.source}: {key}")
    for k in ("factor", "low_freq_factor", "high_freq_factor")[: 3 if kind == "llama3" else 1]:
        if params.get(k) is None:
            raise sub.fail(f"rope_type {kind!r} needs {k!r}")
        sub.positive_float(k, 1.0)
    if kind == "llama3":
        sub.int("original_max_position_embeddings")
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise sub.fail(
                f"high_freq_factor {params['high_freq_factor']} must exceed "
                f"low_freq_factor {params['low_freq_factor']}"
            )
    return theta, params


def _sliding_windows(r: _Reader, family: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer window, mirroring transformers: Mistral windows every layer when
    `sliding_window` is set; Qwen2/3 only with `use_sliding_window`, on the
    layers `layer_types` (or `max_window_layers`) marks as sliding."""
    cfg = r.cfg
    window = r.int("sliding_window", default=0) if cfg.get("sliding_window") else None
    if family == "mistral":
        return (window,) * layers
    if family in ("qwen2", "qwen3") and window and cfg.get("use_sliding_window", False):
        types = cfg.get("layer_types")
        if types is None:
            first = r.int("max_window_layers", default=28, low=0)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        if not isinstance(types, list) or len(types) != layers or any(
            t not in _LAYER_TYPES for t in types
        ):
            raise r.fail(
                f"layer_types must list {layers} entries (num_hidden_layers), each one of "
                f"{', '.join(_LAYER_TYPES)}; got {types!r}"
            )
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers

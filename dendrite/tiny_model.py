"""Build tiny HuggingFace-format model directories, deterministically.

Tests, benchmarks and the offline default model need a real model directory
(config.json, safetensors weights, tokenizer.json, generation_config.json) but
no hub can be reached. This module trains a small byte-level BPE tokenizer with
`tokenizers` on a fixed corpus and writes random weights with `safetensors`,
all from a seed, so the same call always yields the same bytes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|user|>", "<|assistant|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A tree of thought explores many
continuations of one context; each branch shares the prefix it came from.
Question: Natalia sold clips to 48 of her friends in April, and then she sold
half as many clips in May. How many clips did Natalia sell altogether?
Answer: 48 / 2 = 24 clips in May. 48 + 24 = 72 clips. The answer is 72.
{"name": "Ada", "age": 36, "tags": ["math", "engines"], "ok": true, "x": null}
[1, 2, 3.5, -4e10] {"a": {"b": [{"c": "d"}]}} true false null 0123456789
Let's think step by step. First, second, third. Yes or no? red green blue.
def fork(node, n): return [child(node) for _ in range(n)]  # O(1) each
SELECT * FROM branches WHERE score > 0.5 ORDER BY value DESC LIMIT 4;
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train once per process and vocab size: training is deterministic but not free."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok.to_str(pretty=True)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on the fixed corpus and save it.

    Byte-level with the full 256-byte alphabet, so every string encodes; writes
    tokenizer.json and tokenizer_config.json (with a chat template).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_trained_tokenizer_json(vocab_size))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    return out


# -- tiny random-weight models ---------------------------------------------------

_FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

#: Llama-3.1's rope scaling, for `build_tiny_model(rope_scaling=LLAMA3_ROPE_SCALING)`.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _tiny_weights(cfg: dict, family: str, seed: int) -> dict:
    """HF-named random tensors (float32 numpy), deterministic from `seed`.

    Scaled so a random model is decisive: unit-variance embeddings, 1/sqrt(fan_in)
    projections and a wide output layer give top-1 logit margins far above
    float32 accumulation noise, so greedy tokens do not hinge on summation order.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    qkv_bias = family == "qwen2" or cfg.get("attention_bias", False)
    o_bias = family in ("llama", "qwen3") and cfg.get("attention_bias", False)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w = {"model.embed_tokens.weight": normal((v, h), 1.0)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm(h)
        for name, rows in (("q", hq), ("k", hkv), ("v", hkv)):
            w[p + f"self_attn.{name}_proj.weight"] = normal((rows, h), h**-0.5)
            if qkv_bias:
                w[p + f"self_attn.{name}_proj.bias"] = normal(rows, 0.1)
        w[p + "self_attn.o_proj.weight"] = normal((h, hq), hq**-0.5)
        if o_bias:
            w[p + "self_attn.o_proj.bias"] = normal(h, 0.1)
        if family == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(d)
            w[p + "self_attn.k_norm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = normal((i, h), h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((i, h), h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((h, i), i**-0.5)
    w["model.norm.weight"] = norm(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal((v, h), 3.0 * h**-0.5)
    return w


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    rope_theta: float | None = None,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    attention_bias: bool = False,
    max_position_embeddings: int = 4096,
    shards: int = 1,
) -> Path:
    """Write a tiny random-weight HF model dir of `family` and return its path.

    `family` is 'llama', 'mistral', 'qwen2' or 'qwen3'. The vocabulary is the
    tokenizer's unless `vocab_size` pads it larger (as real checkpoints do).
    `sliding_window` windows every layer (Mistral) or, for Qwen, turns on
    `use_sliding_window` for all layers. `shards=2` splits the weights into two
    files plus model.safetensors.index.json. Same arguments, same bytes.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(_FAMILIES)}")
    out = build_tokenizer(out_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab = vocab_size or n_tok
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {n_tok}")
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    arch, model_type = _FAMILIES[family]
    head_dim = head_dim or hidden_size // heads
    if rope_theta is None:
        rope_theta = (
            500000.0 if rope_scaling and rope_scaling.get("rope_type") == "llama3" else 10000.0
        )
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if family == "llama":
        cfg.update(attention_bias=attention_bias, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        cfg["sliding_window"] = sliding_window
    else:  # qwen2 / qwen3
        cfg.update(
            use_sliding_window=sliding_window is not None,
            sliding_window=sliding_window,
            max_window_layers=0,
        )
        if family == "qwen3":
            cfg["attention_bias"] = attention_bias

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    weights = {
        k: torch.from_numpy(a).to(tdtype).contiguous()
        for k, a in _tiny_weights(cfg, family, seed).items()
    }
    for stale in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata=meta)
    else:
        names = list(weights)
        parts = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        for s, idx in enumerate(parts):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {names[j]: weights[names[j]] for j in idx}
            save_file(part, str(out / fname), metadata=meta)
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2)
    )
    return out

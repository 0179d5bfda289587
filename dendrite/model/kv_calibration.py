"""Per-layer scales and K means of an FP8 KV pool, calibrated once at load from a fixed text.

e4m3 keeps 3 mantissa bits over the whole normal range [2^-6, 448]: the
relative rounding error of a stored value does not depend on the scale, as
long as the values stay inside that range. So a scale has one job: keep a
layer's K (after RoPE) and V inside it, away from the saturation at 448. Per
layer is enough: on the default model (SmolLM2-135M) the K/V heads of a layer
differ in range by at most 2.6x and every layer's amax is below 22, and
per-layer, per-head and unit scales all gave the same relative error
(2.6% L2 for K and for V over 700 tokens; docs/quantization.md).

The K mean. Most of K's magnitude in a layer is a per-channel offset shared
by every token (on the default model the mean of |mean over tokens| is 50-94%
of the mean |K|, per layer). Attention does not see it -- every key of a
query's softmax moves by the same q . mean -- but e4m3 rounds it with every
stored key. So K is stored less its calibrated mean per (layer, KV head,
channel), after RoPE (a constant there, so the shift is exact): on 2000
tokens of GSM8K with the default model, perplexity with FP8 pages rose
1.36% over float32 pages without the shift and 0.52% with it (bfloat16:
2.01% and 1.26%; docs/quantization.md).

`calibrate_kv_scales` runs the model once over `CALIBRATION_TEXT` (the first
`max_tokens` tokens, BOS first as real prompts have it) with a model-dtype
cache and the torch reference attention, records every layer's K (after
RoPE) and V, takes K's mean over the tokens, and turns the amax of K less
its mean, and of V, into scales with `scale_for`: 1.0 while the amax lies in
[1, 448 / HEADROOM], else the power of two that maps it into
(224 / HEADROOM, 448 / HEADROOM]. HEADROOM (4x) leaves room for prompts whose
values exceed the calibration text's; beyond that, stores saturate. Powers of
two keep the quantization exact arithmetic (`value / scale` rounds nowhere,
so the torch and Triton writers agree bit for bit) and folding the scale into
the softmax scale adds no rounding; unit scales cost the FP8 readers nothing
at all (FlashInfer skips its `out *= v_scale`).

Deterministic: the same model gives the same scales, whatever is served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dendrite.attention.base import build_attention_metadata
from dendrite.attention.reference import ReferenceBackend
from dendrite.model.kv_cache import FP8_E4M3_MAX, KVCache

__all__ = ["CALIBRATION_TEXT", "HEADROOM", "KVCalibration", "calibrate_kv_scales", "scale_for"]

#: Stored values may grow this much past the calibration amax before they saturate.
HEADROOM = 4.0

#: Mixed prose, dialogue, numbers and code, so that the usual token kinds are seen.
CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined a screw press with movable metal type. Within fifty years, presses "
    "in more than two hundred European cities had printed some twenty million volumes.\n\n"
    "Question: A train leaves the station at 9:40 and arrives at 13:05. How long is the "
    "trip?\nAnswer: From 9:40 to 12:40 is 3 hours, and from 12:40 to 13:05 is 25 minutes, "
    "so the trip takes 3 hours and 25 minutes.\n\n"
    "User: Can you write a function that returns the largest of three numbers?\n"
    "Assistant: Sure. Here it is in Python:\n"
    "def largest(a, b, c):\n    return max(a, max(b, c))\n\n"
    "print(largest(3, 17, -4))  # 17\n\n"
    "Photosynthesis converts light energy into chemical energy: carbon dioxide and water "
    "become glucose and oxygen. {\"name\": \"Ada\", \"age\": 36, \"tags\": [\"math\", "
    "\"engines\"]} Le chat dort sur le canap\u00e9. 1, 2, 3, 5, 8, 13, 21, 34, 55, 89."
)


def scale_for(amax: float, max_value: float = FP8_E4M3_MAX, headroom: float = HEADROOM) -> float:
    """The power-of-two scale of a layer whose calibrated |values| peak at `amax`.

    1.0 when `amax` is in [1, max_value / headroom] (or not a positive finite
    number); otherwise `2^k` with `amax / 2^k` in (top / 2, top], top =
    max_value / headroom.
    """
    top = max_value / headroom
    if not (math.isfinite(amax) and amax > 0) or 1.0 <= amax <= top:
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax / top))


@dataclass(frozen=True)
class KVCalibration:
    """What `calibrate_kv_scales` measured and chose, one entry per layer.

    `k_mean` float32 [num_layers, Hkv, D] (on the model's device) is
    subtracted from K before it is stored; `k_amax` is the amax of K less
    it, `v_amax` of V; `k_scales` / `v_scales` their `scale_for`.
    """

    k_scales: list[float]
    v_scales: list[float]
    k_amax: list[float]
    v_amax: list[float]
    k_mean: torch.Tensor


class _Recorder:
    """A KV store (duck-typed for the model) that keeps every layer's K and V."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.k: list[torch.Tensor | None] = [None] * cache.num_layers
        self.v: list[torch.Tensor | None] = [None] * cache.num_layers

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k.detach().float(), v.detach().float()
        self.cache.write(layer, slot_mapping, k, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.layer(layer)


@torch.inference_mode()
def calibrate_kv_scales(model: Any, tokenizer: Any, *, device: torch.device,
                        dtype: torch.dtype, page_size: int = 16, max_tokens: int = 256,
                        max_value: float = FP8_E4M3_MAX, text: str = CALIBRATION_TEXT,
                        ) -> KVCalibration:
    """One forward of `model` (a `LlamaForCausalLM`) over `text`'s first
    `max_tokens` tokens; the per-layer K means and scales (see the module
    docstring)."""
    cfg = model.config
    ids = [i for i in tokenizer.encode(text) if 0 <= i < cfg.vocab_size][:max_tokens]
    if not ids:
        ids = [0]
    n = len(ids)
    pages = -(-n // page_size)
    cache = KVCache(cfg.num_layers, pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                    device)
    rec = _Recorder(cache)
    backend = ReferenceBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, page_size,
                               sliding_windows=cfg.sliding_windows)
    meta = build_attention_metadata(np.arange(n), np.arange(n), [0, n], [0, pages],
                                    np.arange(pages), [n - (pages - 1) * page_size],
                                    page_size=page_size, device=device)
    backend.plan(meta)
    model(torch.tensor(ids, dtype=torch.int64, device=device), meta, rec, backend)
    missing = [i for i, k in enumerate(rec.k) if k is None]
    if missing:
        raise RuntimeError(f"KV calibration: layers {missing} wrote no K/V")
    k = torch.stack(rec.k)  # type: ignore[arg-type]  # [L, n, Hkv, D]
    v = torch.stack(rec.v)  # type: ignore[arg-type]
    k_mean = k.mean(1)
    k_mean = torch.where(torch.isfinite(k_mean), k_mean, torch.zeros_like(k_mean))
    k_amax = (k - k_mean[:, None]).abs().flatten(1).amax(1).tolist()
    v_amax = v.abs().flatten(1).amax(1).tolist()
    return KVCalibration([scale_for(a, max_value) for a in k_amax],
                         [scale_for(a, max_value) for a in v_amax], k_amax, v_amax, k_mean)

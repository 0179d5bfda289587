"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over paged KV.

The math mirrors transformers op for op (RMSNorm in float32 then cast, RoPE
cos/sin computed in float32 then cast, residual adds in the model dtype) so
fp32 logits agree to ~1e-6 and bf16 rounds the same way. Two fusions change
nothing numerically per output but halve the matmul launches: q/k/v are one
`qkv_proj` and gate/up one `gate_up_proj`; `load_hf_weight` maps HF names.

Which kernels a forward uses is chosen once per step, from its row count and
the `KernelConfig` the runner passes (`_StepKernels.choose`). A one-token step
on CUDA (single-stream decode) runs each layer as four GEMV kernels
(dendrite/kernels/gemv.py) that also do the RMSNorms, SiLU*up and residual
adds, rounding as the unfused ops do; 2-16 rows (a few decode branches) take
the few-row matmul (dendrite/kernels/skinny.py), likewise fused. FP8 / MXFP8
projections (QuantLinear) take the same GEMV and few-row kernels with their
block scales; at more rows they run as modules
(dendrite/kernels/fp8_matmul.py). Larger
batches on CUDA take one kernel each for RMSNorm (+ the residual add before
it) and SiLU*up around cuBLAS, and every CUDA step does RoPE with the K/V
cache write in one kernel (dendrite/kernels/rows.py). With a family off in
the config, the torch ops run in its place.

The forward pass takes a flat batch of T new tokens from B sequences (no
padding): it writes each layer's new K/V at `meta.slot_mapping` and asks the
attention backend, already planned for `meta`, to attend over the pages.
The KV argument is duck-typed: anything with `write(layer, slots, k, v)` and
`layer(l) -> (k_cache, v_cache)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dendrite.attention.base import AttentionBackend, AttentionMetadata
from dendrite.kernels import gemv, linear, skinny, skinny_supported, supported
from dendrite.kernels.config import KernelConfig
from dendrite.kernels.rows import (
    add_rms_norm,
    rope_write,
    rope_write_supported,
    rows_supported,
    silu_mul,
)
from dendrite.model.config import ModelConfig
from dendrite.model.kv_cache import KVCache

__all__ = ["LlamaForCausalLM", "rope_inv_freq"]

_ALL = KernelConfig()


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """float32 [D/2] inverse frequencies, with Llama-3 / linear scaling (as transformers)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / float(sc["factor"])
    # llama3: keep high frequencies, divide low ones by `factor`, blend between.
    factor, lo, hi = (
        float(sc["factor"]),
        float(sc["low_freq_factor"]),
        float(sc["high_freq_factor"]),
    )
    old_ctx = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _scales(proj: nn.Module) -> dict[str, object]:
    """The fused kernels' weight-scale arguments for a projection: none for a
    dense nn.Linear, `scale` and `block` for a QuantLinear (e4m3 `weight`)."""
    scale = getattr(proj, "weight_scale", None)
    return {} if scale is None else {"scale": scale, "block": proj.block}


@dataclass(frozen=True)
class _StepKernels:
    """The kernels of one forward, chosen once for all its layers."""

    #: `gemv` (one row) or `skinny` (2-16 rows): each decoder layer is four
    #: fused matmuls; None: the projections are `F.linear` (cuBLAS) or
    #: QuantLinear's own kernels.
    matmul: Callable[..., torch.Tensor] | None
    #: The fused row kernels (RMSNorm + residual, SiLU*up, RoPE + K/V write).
    rows: bool

    @staticmethod
    def choose(h: torch.Tensor, layer: "DecoderLayer | None",
               kernels: KernelConfig) -> "_StepKernels":
        """For hidden states `h` [T, H] and the first decoder layer (every layer
        has its projections' shapes, dtypes, scale blocks and layout)."""
        matmul = None
        if layer is not None:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
            # (projection, SiLU*up fused into it: the input is [gate | up])
            one = [(qkv, False), (o, False), (gate_up, False), (down, True)]
            if all(supported(h, p.weight, glu=glu, kernels=kernels,
                             width=p.in_features * (2 if glu else 1), **_scales(p))
                   for p, glu in one):
                matmul = gemv
            else:
                rows = [(qkv, False), (o, False), (gate_up, True), (down, False)]
                if all(skinny_supported(h, p.weight, glu_out=glu, kernels=kernels,
                                        width=p.in_features, **_scales(p)) for p, glu in rows):
                    matmul = skinny
        return _StepKernels(matmul, rows_supported(h, kernels))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # (Called as modules only on steps without a fused matmul (`_StepKernels`),
        # where the single- and few-row kernels do not apply: plain nn.Linear.)
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend,
        rows: bool,
    ) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin, meta, kv, backend, rows))

    def attend(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend,
        rows: bool,
    ) -> torch.Tensor:
        """Projected q|k|v [T, (Hq + 2 Hkv) D] -> attention output [T, Hq D] (pre o_proj).

        `rows`: the step may use the fused row kernels (`_StepKernels.rows`)."""
        t = qkv.shape[0]
        if not self.qk_norm and isinstance(kv, KVCache) and rows \
                and rope_write_supported(self.d):
            # One kernel for RoPE on q and k and both cache writes (same rounding).
            k_cache, v_cache = kv.layer(self.layer)
            q = rope_write(qkv, cos, sin, meta.slot_mapping, k_cache, v_cache,
                           self.hq, self.hkv, self.d,
                           **kv.write_args(self.layer))  # (FP8 pages: quantized on store)
            return backend.forward(self.layer, q, k_cache, v_cache).reshape(t, self.hq * self.d)
        q, k, v = qkv.split(
            [self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1
        )
        q, k, v = (
            q.view(t, self.hq, self.d),
            k.view(t, self.hkv, self.d),
            v.view(t, self.hkv, self.d),
        )
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv.write(self.layer, meta.slot_mapping, k, v)
        o = backend.forward(self.layer, q, *kv.layer(self.layer))
        return o.reshape(t, self.hq * self.d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        #: Tensor parallel (set by dendrite.parallel): sums the row-parallel
        #: o_proj / down_proj partial outputs over the ranks, in place. It runs
        #: before the residual add, so the fused residual of the GEMV / few-row
        #: kernels is bypassed then. None: one rank.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend,
        step: _StepKernels,
    ) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        mm, ar = step.matmul, self.all_reduce
        if mm is not None:
            # Decode of one row (GEMV) or a few (few-row matmul): four kernels
            # that also do the norms, the residual adds and SiLU*up (same
            # rounding, fewer launches). SiLU*up is the down projection's
            # prologue for one row, the gate|up matmul's epilogue for several.
            one_row = mm is gemv
            ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
            qkv_p, o_p = attn.qkv_proj, attn.o_proj
            qkv = mm(h, qkv_p.weight, qkv_p.bias, norm_weight=ln1.weight, eps=ln1.eps,
                     **_scales(qkv_p))
            o = attn.attend(qkv, cos, sin, meta, kv, backend, step.rows)
            if ar is None:
                h = mm(o, o_p.weight, o_p.bias, residual=h, **_scales(o_p))
            else:  # tensor parallel: sum the partial outputs, then the residual
                h = h + ar(mm(o, o_p.weight, o_p.bias, **_scales(o_p)))
            up, down = mlp.gate_up_proj, mlp.down_proj
            if one_row:
                gate_up = gemv(h, up.weight, up.bias, norm_weight=ln2.weight, eps=ln2.eps,
                               **_scales(up))
                if ar is not None:
                    return h + ar(gemv(gate_up, down.weight, down.bias, glu=True,
                                       **_scales(down)))
                return gemv(gate_up, down.weight, down.bias, glu=True, residual=h,
                            **_scales(down))
            act = skinny(h, up.weight, up.bias, norm_weight=ln2.weight, eps=ln2.eps,
                         glu_out=True, **_scales(up))
            if ar is not None:
                return h + ar(skinny(act, down.weight, down.bias, **_scales(down)))
            return skinny(act, down.weight, down.bias, residual=h, **_scales(down))
        a = attn(self.input_layernorm(h), cos, sin, meta, kv, backend, step.rows)
        h = h + (a if ar is None else ar(a))
        m = mlp(self.post_attention_layernorm(h))
        return h + (m if ar is None else ar(m))

    def forward_rows(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for many rows on CUDA with the fused row kernels.

        The residual add that ends a sublayer is done by the next RMSNorm's
        kernel, so the layer takes and returns the pair (output of its last
        sublayer, residual stream before it); `residual` is None for the first
        layer. Rounding is `forward`'s (dendrite/kernels/rows.py).
        """
        ln1, ln2, mlp = self.input_layernorm, self.post_attention_layernorm, self.mlp
        ar = self.all_reduce
        normed, residual = add_rms_norm(x, residual, ln1.weight, ln1.eps)
        a = self.self_attn(normed, cos, sin, meta, kv, backend, rows=True)
        normed, residual = add_rms_norm(a if ar is None else ar(a), residual,
                                        ln2.weight, ln2.eps)
        out = mlp.down_proj(silu_mul(mlp.gate_up_proj(normed)))
        return (out if ar is None else ar(out)), residual


class _Body(nn.Module):
    """HF's `model.` submodule, so parameter names line up with checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# HF name -> (our fused parameter, which slice of it): q|k|v and gate|up.
_FUSED = re.compile(
    r"^(model\.layers\.\d+\.)(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.(weight|bias)$"
)


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T], meta, kv) -> hidden [T, H]`; `compute_logits(hidden) -> fp32`."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.backend = backend
        self.model = _Body(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute non-checkpoint buffers (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.model.norm.weight.device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The dense output projection weight (the embedding when tied); a
        quantized head's e4m3 data when `quantize_lm_head` replaced it."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend | None = None,
        kernels: KernelConfig = _ALL,
    ) -> torch.Tensor:
        """Hidden states after the final norm; `backend` must be planned for `meta`.

        `kernels`: the families this step may use (the runner's config)."""
        backend = backend or self.backend
        if backend is None:
            raise ValueError("no attention backend: pass one or set model.backend")
        # A gather, not nn.Embedding's index_select: same values, and on CUDA
        # ~2 us instead of ~14 us for 16 rows of a 128K vocabulary (H100).
        h = self.model.embed_tokens.weight[input_ids]
        # RoPE tables for this step's positions, shared by every layer.
        freqs = meta.positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype)[:, None, :], emb.sin().to(h.dtype)[:, None, :]
        norm = self.model.norm
        first = self.model.layers[0] if self.model.layers else None
        step = _StepKernels.choose(h, first, kernels)
        if step.rows and step.matmul is None:
            residual = None
            for layer in self.model.layers:
                h, residual = layer.forward_rows(h, residual, cos, sin, meta, kv, backend)
            return add_rms_norm(h, residual, norm.weight, norm.eps)[0]
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta, kv, backend, step)
        if step.rows:
            return add_rms_norm(h, None, norm.weight, norm.eps)[0]
        return norm(h)

    def compute_logits(self, hidden: torch.Tensor,
                       kernels: KernelConfig = _ALL) -> torch.Tensor:
        """[N, H] -> float32 [N, vocab]; matmul in the model dtype like transformers
        (the single- or few-row kernel for 1-16 CUDA rows, where `kernels` allows).
        A quantized head (`quantize_lm_head` at load) is a QuantLinear module."""
        head = self.lm_head
        if head is not None and not isinstance(head, nn.Linear):
            return head(hidden).float()
        return linear(hidden, self.lm_head_weight, kernels=kernels).float()

    # -- checkpoint loading ---------------------------------------------------
    def hf_parameter_names(self) -> set[str]:
        """Checkpoint names this model needs (unfused, HF spelling)."""
        names = set()
        for name, _ in self.named_parameters():
            if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                kind = name.rsplit(".", 1)[1]
                base = name.rsplit(".qkv_proj.", 1)[0]
                names |= {f"{base}.{p}_proj.{kind}" for p in "qkv"}
            elif ".gate_up_proj." in name:
                base, kind = name.rsplit(".gate_up_proj.", 1)
                names |= {f"{base}.gate_proj.{kind}", f"{base}.up_proj.{kind}"}
            else:
                names.add(name)
        return names

    def load_hf_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor into place (casting dtype/device).

        Returns False for names the model has no slot for (the caller decides
        whether that is an error)."""
        m = _FUSED.match(name)
        if m:
            prefix, _, qkv, gu, kind = m.groups()
            if qkv:
                param = self.get_parameter(f"{prefix}self_attn.qkv_proj.{kind}")
                hq, hkv, d = self.config.num_heads, self.config.num_kv_heads, self.config.head_dim
                start, size = {
                    "q": (0, hq * d),
                    "k": (hq * d, hkv * d),
                    "v": ((hq + hkv) * d, hkv * d),
                }[qkv]
            else:
                param = self.get_parameter(f"{prefix}mlp.gate_up_proj.{kind}")
                inter = self.config.intermediate_size
                start, size = (0 if gu == "gate" else inter), inter
            dst = param.data.narrow(0, start, size)
        else:
            try:
                dst = self.get_parameter(name).data
            except AttributeError:
                return False
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        return True

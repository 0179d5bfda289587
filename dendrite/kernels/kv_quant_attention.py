"""Paged decode attention that reads N-bit KV pages directly (Triton), and its torch twin.

Both take the query already rotated by the format's matrix (`q @ M`) and
return the output still rotated (the caller multiplies by `M^T` once), so
neither touches the rotation. One query token per sequence (decode); each
sequence's KV is its page list `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` and
its first `kv_lens[b]` tokens; GQA groups `num_heads / num_kv_heads` query
heads per KV head (query head `i` reads KV head `i // group`).

`decode_attention` (CUDA, Triton) splits each sequence's tokens over up to
`max_splits` programs so that a few long sequences still fill the GPU, and
merges the splits' log-sum-exps in torch. It decodes K/V in registers and
runs both products as fp16 `tl.dot` with float32 accumulation: its outputs
differ from `decode_attention_torch` (float32 throughout) by fp16 rounding of
q, the decoded K/V and the probabilities, far below the 3-4 bit error.
"""

from __future__ import annotations

import math

import torch

from dendrite.kernels.config import triton_available
from dendrite.model.kv_quant import KVQuantFormat

__all__ = ["decode_attention", "decode_attention_torch", "plan_splits", "supported"]

#: Tokens per inner step of a program.
BLOCK_N = 32
#: Programs per SM the split heuristic aims for.
_PROGRAMS_PER_SM = 2


def supported(fmt: KVQuantFormat, num_heads: int, num_kv_heads: int,
              device: torch.device | str) -> bool:
    """Whether the Triton kernel runs this format and head layout on `device`."""
    d = fmt.head_dim
    return (torch.device(device).type == "cuda" and triton_available()
            and 16 <= d <= 256 and d & (d - 1) == 0
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 128)


def plan_splits(batch: int, num_kv_heads: int, max_kv_len: int, num_sms: int,
                block_n: int = BLOCK_N, max_splits: int = 64) -> tuple[int, int]:
    """(num_splits, split_len): enough programs to fill `num_sms` twice over, each
    range a multiple of `block_n` tokens and no more ranges than blocks."""
    blocks = max(1, math.ceil(max_kv_len / block_n))
    want = math.ceil(_PROGRAMS_PER_SM * num_sms / max(1, batch * num_kv_heads))
    splits = max(1, min(want, blocks, max_splits))
    split_len = math.ceil(blocks / splits) * block_n
    return math.ceil(max_kv_len / split_len) if max_kv_len else 1, split_len


def decode_attention_torch(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                           kv_lens: torch.Tensor, fmt: KVQuantFormat,
                           sm_scale: float) -> torch.Tensor:
    """The same attention in float32 torch: gather each sequence's rows, dequantize, softmax.

    q float32 [B, Hq, D] (rotated); pages uint8 [P, page_size, Hkv, row_bytes];
    returns float32 [B, Hq, D] (rotated)."""
    bsz, hq, d = q.shape
    ps, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    indptr, lens = kv_indptr.tolist(), kv_lens.tolist()
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    offs = torch.arange(ps, device=q.device)
    for b in range(bsz):
        pages = kv_indices[indptr[b]: indptr[b + 1]].long()
        slots = (pages[:, None] * ps + offs).reshape(-1)[: lens[b]]
        k = fmt.dequantize(k_pages.reshape(-1, hkv, fmt.row_bytes)[slots])  # [n, Hkv, D]
        v = fmt.dequantize(v_pages.reshape(-1, hkv, fmt.row_bytes)[slots])
        qb = q[b].float().view(hkv, g, d)
        s = torch.einsum("hgd,nhd->hgn", qb, k) * sm_scale
        out[b] = torch.einsum("hgn,nhd->hgd", s.softmax(-1), v).reshape(hq, d)
    return out


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_lens: torch.Tensor,
                     fmt: KVQuantFormat, sm_scale: float, *, max_kv_len: int,
                     num_splits: int | None = None, block_n: int = BLOCK_N,
                     contiguous: bool = True) -> torch.Tensor:
    """Triton decode attention over packed pages (see the module docstring).

    `kv_indptr[b]` is where sequence b's pages start in `kv_indices` (only
    the first B entries are read). `max_kv_len` (the longest `kv_lens`, from
    the host) sizes the splits; `num_splits` overrides the heuristic.
    `contiguous` (int4): load each row's code bytes once and split nibbles in
    registers; False loads a byte per channel (the int3 way). Returns float32
    [B, Hq, D] (rotated).
    """
    from dendrite.kernels._kv_quant_triton import quant_decode_partial

    bsz, hq, d = q.shape
    ps, hkv, row = k_pages.shape[1], k_pages.shape[2], k_pages.shape[3]
    if d != fmt.head_dim or row != fmt.row_bytes or k_pages.dtype != torch.uint8:
        raise ValueError(f"pages {k_pages.dtype} {tuple(k_pages.shape)} do not hold "
                         f"{fmt} (row_bytes {fmt.row_bytes})")
    g = hq // hkv
    if num_splits is None:
        sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
               if q.device.type == "cuda" else 8)
        num_splits, split_len = plan_splits(bsz, hkv, max_kv_len, sms, block_n)
    else:
        blocks = max(1, math.ceil(max_kv_len / block_n))
        split_len = math.ceil(blocks / max(1, min(num_splits, blocks))) * block_n
        num_splits = max(1, math.ceil(max_kv_len / split_len))
    o = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    if bsz == 0:
        return o[:, :, 0]
    quant_decode_partial[(bsz, hkv, num_splits)](
        q.float().contiguous(), k_pages, v_pages, kv_indptr, kv_indices, kv_lens, o, lse,
        sm_scale * math.log2(math.e), split_len, num_splits,
        HKV=hkv, G=g, BLOCK_G=max(16, _next_pow2(g)), D=d, PAGE=ps, ROW=row,
        BITS=fmt.bits, GROUP=fmt.group_size, CODE_BYTES=fmt.code_bytes, BLOCK_N=block_n,
        CONTIG=contiguous, num_warps=4,
    )
    if num_splits == 1:
        return o[:, :, 0]
    w = torch.exp2(lse - lse.amax(-1, keepdim=True))  # split 0 is never empty: max finite
    return (o * w[..., None]).sum(2) / w.sum(-1)[..., None]


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, n - 1).bit_length()

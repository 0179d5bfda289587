"""One-pass sampling on the GPU: grammar mask, temperature, seeded Gumbel noise,
argmax and the chosen token's logprob, in two Triton launches.

The torch sampler (`dendrite.sampling`) spells the same computation as ~40
elementwise kernels over a [B, V] int64 tensor (the counter-based noise is
integer hashing), plus a log-softmax and the mask unpacking. At B = 16 and a
128K vocabulary that is about half a millisecond of GPU time and as many
launches as a whole CUDA-graph decode step; this kernel reads each logit once.

Equivalence with the torch sampler, which stays the reference (CPU, and the
parameters this kernel leaves to it: repetition penalty, top-k / top-p /
min-p, top-n logprobs):

* the noise is the same 32-bit hash of `(key, token)` computed in uint32
  (the torch version emulates uint32 products in int64), turned into a
  Gumbel draw with libdevice `log`, as CUDA's `logf` used by torch;
* the temperature divides with round-to-nearest (`div_rn`), as torch does;
* ties go to the lowest token id (chunks are reduced in order, `argmax`
  breaks ties to the left), as `torch.argmax`.

So the token of a row is the torch sampler's; the logprob differs only by
float32 summation order (the log-sum-exp is reduced chunk by chunk).

Layout: launch 1 has one program per (row, 4096-token chunk) and writes the
chunk's max logit, sum of exponentials, best score and its token; launch 2 has
one program per row and combines them.
"""

from __future__ import annotations


import numpy as np
import torch

from dendrite.kernels.config import KernelConfig, triton_available

__all__ = ["fused_sample", "fused_sampling_available", "pack_row_params", "CHUNK"]

#: Tokens per program of the first pass.
CHUNK = 4096

_ALL = KernelConfig()


def fused_sampling_available(kernels: KernelConfig = _ALL) -> bool:
    """`kernels.fused_sampling` allows the kernel and Triton imports."""
    return kernels.fused_sampling and triton_available()


def _kernels():
    # Triton is imported only when a CUDA sampler runs (CPU installs lack it).
    from dendrite.kernels import _sample_triton  # noqa: PLC0415

    return _sample_triton.triton, _sample_triton.chunk_kernel, _sample_triton.reduce_kernel


def pack_row_params(keys: list[int], temperatures: list[float]) -> np.ndarray:
    """int32 [B, 3]: key low word, key high word, temperature bits (0 = greedy)."""
    b = len(keys)
    out = np.empty((b, 3), dtype=np.uint32)
    k = np.asarray(keys, dtype=np.uint64)
    out[:, 0] = (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    out[:, 1] = (k >> np.uint64(32)).astype(np.uint32)
    out[:, 2] = np.asarray(temperatures, dtype=np.float32).view(np.uint32)
    return out.view(np.int32)


def fused_sample(logits: torch.Tensor, row_params: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (int64 [B]) and their logprobs (float32 [B]) for CUDA `logits` [B, V].

    `row_params` is `pack_row_params(...)` on the logits' device; `mask` the
    packed allowed-token words (int32 [B, W], bit j of word w allows token
    32 w + j; tokens past 32 W are disallowed) or None.
    """
    triton, chunk_kernel, reduce_kernel = _kernels()
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_chunks = triton.cdiv(v, CHUNK)
    parts = torch.empty((b, n_chunks, 3), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((b, n_chunks), dtype=torch.int32, device=logits.device)
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b == 0:
        return tokens, logprobs
    has_mask = mask is not None
    if has_mask and mask.stride(1) != 1:
        mask = mask.contiguous()
    chunk_kernel[(b, n_chunks)](
        logits, logits.stride(0), row_params, mask if has_mask else row_params,
        mask.stride(0) if has_mask else 0, mask.shape[1] if has_mask else 0,
        parts, best_idx, v, n_chunks, HAS_MASK=has_mask, BLOCK=CHUNK, num_warps=8)
    reduce_kernel[(b,)](logits, logits.stride(0), parts, best_idx, n_chunks, tokens, logprobs,
                        NC=max(16, triton.next_power_of_2(n_chunks)), num_warps=1)
    return tokens, logprobs

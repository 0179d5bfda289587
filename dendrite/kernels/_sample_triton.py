"""Triton kernels of `dendrite.kernels.sample` (imported only where Triton is)."""

import triton
import triton.language as tl

from dendrite.kernels._precise import precise_div, precise_log


@triton.jit
def chunk_kernel(logits_ptr, stride_l, params_ptr, mask_ptr, stride_m, mask_words,
                 part_ptr, idx_ptr, V, n_chunks,
                 HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + offs, mask=valid,
                other=float("-inf")).to(tl.float32)
    # Log-sum-exp partials of the raw logits (the reported logprob is the model's).
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(x - m_safe), axis=0)
    score = x
    if HAS_MASK:
        word_idx = offs // 32
        words = tl.load(mask_ptr + row.to(tl.int64) * stride_m + word_idx,
                        mask=valid & (word_idx < mask_words), other=0)
        bit = (words >> (offs % 32)) & 1
        score = tl.where(bit != 0, score, float("-inf"))
    key_lo = tl.load(params_ptr + row * 3).to(tl.uint32, bitcast=True)
    key_hi = tl.load(params_ptr + row * 3 + 1).to(tl.uint32, bitcast=True)
    temp = tl.load(params_ptr + row * 3 + 2).to(tl.float32, bitcast=True)
    if temp > 0.0:
        # Two rounds of "lowbias32" (C. Wellons), keyed by the two key
        # words; uint32 products wrap mod 2**32 as the hash intends.
        h = offs.to(tl.uint32) ^ key_lo
        for _ in tl.static_range(2):
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            if _ == 0:
                h = h ^ key_hi
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        gumbel = -precise_log(-precise_log(u))
        score = precise_div(score, temp) + gumbel
    # NaN logits (a broken model) must still yield an in-vocabulary id: argmax
    # over NaNs may pick a padded lane >= V, and with lookahead that id is fed
    # to the next step's embedding gather before the host sees the NaN logprob.
    score = tl.where(valid & (score == score), score, float("-inf"))
    best = tl.argmax(score, axis=0, tie_break_left=True)
    best_score = tl.max(score, axis=0)
    base = part_ptr + (row * n_chunks + chunk) * 3
    tl.store(base, m)
    tl.store(base + 1, s)
    tl.store(base + 2, best_score)
    tl.store(idx_ptr + row * n_chunks + chunk, chunk * BLOCK + best)

@triton.jit
def reduce_kernel(logits_ptr, stride_l, part_ptr, idx_ptr, n_chunks, tokens_ptr,
                  logprobs_ptr,
                  NC: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, NC)
    ok = c < n_chunks
    base = part_ptr + (row * n_chunks + c) * 3
    m = tl.load(base, mask=ok, other=float("-inf"))
    s = tl.load(base + 1, mask=ok, other=0.0)
    best_score = tl.load(base + 2, mask=ok, other=float("-inf"))
    best_idx = tl.load(idx_ptr + row * n_chunks + c, mask=ok, other=0)
    big_m = tl.max(m, axis=0)
    lse = big_m + tl.log(tl.sum(s * tl.exp(m - big_m), axis=0))
    j = tl.argmax(best_score, axis=0, tie_break_left=True)
    token = tl.sum(tl.where(c == j, best_idx, 0), axis=0).to(tl.int64)
    chosen = tl.load(logits_ptr + row.to(tl.int64) * stride_l + token).to(tl.float32)
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, chosen - lse)

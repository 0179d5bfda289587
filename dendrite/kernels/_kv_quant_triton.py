"""Triton kernels of N-bit KV pages (dendrite/model/kv_quant.py): read by decode
attention (`dendrite.kernels.kv_quant_attention`), written by `QuantKVCache.write`
(imported only where Triton is).

`quant_decode_partial`: one program per (sequence, KV head, split) walks its
token range of the sequence's page list, BLOCK_N tokens at a time. It loads
the packed K/V rows of those tokens (dendrite/model/kv_quant.py's layout),
decodes them in registers (bit planes -> codes, times the row's fp16 scale
plus its min, per group), and keeps an online softmax in float32 (base 2)
for the GQA group's query heads, padded to BLOCK_G rows so both products run
as `tl.dot` on fp16 inputs with float32 accumulation. It stores the range's
normalized output and log2-sum-exp per (sequence, query head, split); an
empty range stores 0 and -inf. The caller merges the splits.

`quant_write`: one program per (block of new tokens, KV head) rotates the
block's vectors (one float32 matmul by `M`), quantizes each group and stores
codes, scales and mins into the tokens' rows: the torch writer's bytes, but
for float32 summation order in the rotation and ties rounding up (torch.round
rounds them to even), so a code may differ by one at a rounding boundary.
"""

import triton
import triton.language as tl


@triton.jit
def _codes(rows_ptr, offs_d, BITS: tl.constexpr, D: tl.constexpr, CONTIG: tl.constexpr):
    """Integer codes [BLOCK_N, D] (int32) of the rows at byte pointers `rows_ptr` [BLOCK_N].

    CONTIG (4 bits): load each row's D/2 code bytes once, contiguously, and split
    the nibbles in registers (join + permute); else every channel loads its byte."""
    base = rows_ptr[:, None]
    if BITS == 4 and CONTIG:
        n4c: tl.constexpr = D // 2
        b = tl.load(base + tl.arange(0, n4c)[None, :]).to(tl.int32)
        both = tl.join(b & 15, b >> 4)                # [BLOCK_N, D/2, 2]: (byte, nibble)
        return tl.reshape(tl.permute(both, (0, 2, 1)), (b.shape[0], D))
    elif BITS == 4:
        n4: tl.constexpr = D // 2
        b = tl.load(base + (offs_d % n4)[None, :]).to(tl.int32)
        return (b >> (4 * (offs_d // n4))[None, :]) & 15
    else:  # 3 bits: a 2-bit plane, then a 1-bit plane
        n2: tl.constexpr = D // 4
        n1: tl.constexpr = D // 8
        lo = tl.load(base + (offs_d % n2)[None, :]).to(tl.int32)
        hi = tl.load(base + n2 + (offs_d % n1)[None, :]).to(tl.int32)
        return ((lo >> (2 * (offs_d // n2))[None, :]) & 3) | \
            (((hi >> (offs_d // n1)[None, :]) & 1) << 2)


@triton.jit
def _decode_rows(rows_ptr, offs_d, BITS: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                 CODE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG: tl.constexpr):
    """Dequantized rows [BLOCK_N, D] float32 (still rotated)."""
    NG: tl.constexpr = D // GROUP
    codes = _codes(rows_ptr, offs_d, BITS, D, CONTIG).to(tl.float32)
    offs_g = tl.arange(0, NG)
    sc_ptr = (rows_ptr[:, None] + CODE_BYTES + 2 * offs_g[None, :]).to(tl.pointer_type(tl.float16))
    scale = tl.load(sc_ptr).to(tl.float32)          # [BLOCK_N, NG]
    lo = tl.load(sc_ptr + NG).to(tl.float32)        # fp16 mins follow the scales
    if NG == 1:
        return codes * scale + lo
    else:
        c3 = tl.reshape(codes, [BLOCK_N, NG, GROUP])
        return tl.reshape(c3 * scale[:, :, None] + lo[:, :, None], [BLOCK_N, D])


@triton.jit
def quant_decode_partial(q_ptr, k_ptr, v_ptr, indptr_ptr, indices_ptr, lens_ptr, o_ptr, lse_ptr,
                         sm_scale_log2, split_len, num_splits,
                         HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                         D: tl.constexpr, PAGE: tl.constexpr, ROW: tl.constexpr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, CODE_BYTES: tl.constexpr,
                         BLOCK_N: tl.constexpr, CONTIG: tl.constexpr):
    """Program (b, h, s): sequence b, KV head h, tokens [s * split_len, (s+1) * split_len).

    q [B, HKV * G, D] float32 (rotated); k/v pages uint8 [pages, PAGE, HKV, ROW];
    o [B, HKV * G, num_splits, D] float32; lse [B, HKV * G, num_splits] float32.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    kv_len = tl.load(lens_ptr + b)
    page0 = tl.load(indptr_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    head = h * G + offs_g
    q = tl.load(q_ptr + (b * HKV * G + head).to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    q = (q * sm_scale_log2).to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        ok = t < end
        page = tl.load(indices_ptr + page0 + t // PAGE, mask=ok, other=0)
        row = ((page.to(tl.int64) * PAGE + t % PAGE) * HKV + h) * ROW
        k = _decode_rows(k_ptr + row, offs_d, BITS, D, GROUP, CODE_BYTES, BLOCK_N,
                         CONTIG)
        sc = tl.dot(q, tl.trans(k.to(tl.float16)))  # [BLOCK_G, BLOCK_N], log2 units
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _decode_rows(v_ptr + row, offs_d, BITS, D, GROUP, CODE_BYTES, BLOCK_N,
                         CONTIG)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
        m_i = m_new

    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row_o = (b * HKV * G + head).to(tl.int64) * num_splits + s
    tl.store(o_ptr + row_o[:, None] * D + offs_d[None, :], o, mask=g_ok[:, None])
    tl.store(lse_ptr + row_o, lse, mask=g_ok)


@triton.jit
def quant_write(x_ptr, rot_ptr, slots_ptr, pages_ptr, num_tokens,
                HKV: tl.constexpr, D: tl.constexpr, ROW: tl.constexpr, BITS: tl.constexpr,
                GROUP: tl.constexpr, CODE_BYTES: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (i, h): tokens [i * BLOCK_T, (i+1) * BLOCK_T) of KV head h.

    x [T, HKV, D] (any float dtype) is rotated (`x @ M`, float32), quantized
    per group (fp16 scale and min, codes rounded half up) and packed into the
    row of its slot in `pages` (uint8 [slots, HKV, ROW])."""
    NG: tl.constexpr = D // GROUP
    LEVELS: tl.constexpr = (1 << BITS) - 1
    i = tl.program_id(0)
    h = tl.program_id(1)
    t = i * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < num_tokens
    offs_d = tl.arange(0, D)
    x = tl.load(x_ptr + (t.to(tl.int64) * HKV + h)[:, None] * D + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    m = tl.load(rot_ptr + offs_d[:, None] * D + offs_d[None, :])
    xr = tl.dot(x, m, input_precision="ieee")                 # [BLOCK_T, D]
    x3 = tl.reshape(xr, [BLOCK_T, NG, GROUP])
    lo = tl.min(x3, 2)
    hi = tl.max(x3, 2)
    scale = ((hi - lo) / LEVELS).to(tl.float16)
    scale = tl.where(scale > 0, scale, 1.0).to(tl.float16)
    lo16 = lo.to(tl.float16)
    q = (x3 - lo16.to(tl.float32)[:, :, None]) / scale.to(tl.float32)[:, :, None]
    codes = tl.minimum(tl.maximum(tl.floor(q + 0.5), 0.0), LEVELS).to(tl.int32)
    codes = tl.reshape(codes, [BLOCK_T, D])

    slot = tl.load(slots_ptr + t, mask=ok, other=0)
    row = pages_ptr + (slot.to(tl.int64) * HKV + h) * ROW     # [BLOCK_T] byte pointers
    if BITS == 4:
        n4: tl.constexpr = D // 2
        c = tl.reshape(codes, [BLOCK_T, 2, n4])
        packed = tl.sum(c << (4 * tl.arange(0, 2))[None, :, None], 1)
        tl.store(row[:, None] + tl.arange(0, n4)[None, :], packed.to(tl.uint8),
                 mask=ok[:, None])
    else:  # a 2-bit plane, then a 1-bit plane
        n2: tl.constexpr = D // 4
        n1: tl.constexpr = D // 8
        c2 = tl.reshape(codes & 3, [BLOCK_T, 4, n2])
        p2 = tl.sum(c2 << (2 * tl.arange(0, 4))[None, :, None], 1)
        tl.store(row[:, None] + tl.arange(0, n2)[None, :], p2.to(tl.uint8), mask=ok[:, None])
        c1 = tl.reshape(codes >> 2, [BLOCK_T, 8, n1])
        p1 = tl.sum(c1 << tl.arange(0, 8)[None, :, None], 1)
        tl.store(row[:, None] + n2 + tl.arange(0, n1)[None, :], p1.to(tl.uint8),
                 mask=ok[:, None])
    offs_g = tl.arange(0, NG)
    sc_ptr = (row[:, None] + CODE_BYTES + 2 * offs_g[None, :]).to(tl.pointer_type(tl.float16))
    tl.store(sc_ptr, scale, mask=ok[:, None])
    tl.store(sc_ptr + NG, lo16, mask=ok[:, None])

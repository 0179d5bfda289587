"""Triton kernels of `dendrite.kernels.tree_attention` (imported only where Triton is).

`tree_attention_partial`: a persistent grid walks the work list; one work
item is (a run of leaves, a token range of one page list, a split slot) for
one KV head. Its program loads the queries of those leaves' GQA group heads
as the rows of one tile (leaf-major: row = leaf * GROUP + g), streams the
range's K/V rows through the page table (FP8 pages converted to the query
dtype as they load), and keeps an online softmax in float32 (base 2). It stores the range's normalized output (in the model
dtype) and log-sum-exp (float32) per (leaf, query head) in the split slot.

`tree_attention_merge`: one program per (leaf, query head) combines the
leaf's split slots into the attention output.
"""

import triton
import triton.language as tl


@triton.jit
def tree_attention_partial(q_ptr, k_ptr, v_ptr, indices_ptr, sched_ptr, o_part_ptr,
                           lse_part_ptr, sm_scale_log2, v_scale, stride_page, stride_tok,
                           items_off,
                           HQ: tl.constexpr, HKV: tl.constexpr,
                           D: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
                           MAX_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Work w of sched (item w // HKV, KV head w % HKV), w = pid, pid + grid, ...

    sched[0] is the number of items; item i is the 6 int32 at
    sched[items_off + 6 i]: first leaf, leaves, page-list offset in
    `indices`, first token, end token, split slot. `sm_scale_log2` includes
    the K scale of FP8 pages; `v_scale` multiplies the output.
    """
    pid = tl.program_id(0)
    n_work = tl.load(sched_ptr) * HKV
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    dt = q_ptr.dtype.element_ty  # the compute dtype; the pages may be FP8
    for w in range(pid, n_work, tl.num_programs(0)):
        rec = sched_ptr + items_off + (w // HKV) * 6
        h = w % HKV
        leaf0 = tl.load(rec)
        nleaves = tl.load(rec + 1)
        page_off = tl.load(rec + 2)
        t0 = tl.load(rec + 3)
        t1 = tl.load(rec + 4)
        split = tl.load(rec + 5)
        leaf = leaf0 + rows // GROUP
        head = h * GROUP + rows % GROUP
        row_ok = rows // GROUP < nleaves
        q = tl.load(q_ptr + (leaf * HQ + head).to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(t0, t1, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            ok = t < t1
            page = tl.load(indices_ptr + page_off + t // PAGE, mask=ok, other=0)
            kv_off = page.to(tl.int64) * stride_page + (t % PAGE) * stride_tok + h * D
            k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=ok[:, None],
                        other=0.0).to(dt)
            v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=ok[:, None],
                        other=0.0).to(dt)
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
            m_i = m_new
        out = acc / l_i[:, None] * v_scale
        lse = m_i + tl.log2(l_i)
        slot = ((leaf * HQ + head) * MAX_SPLITS + split).to(tl.int64)
        tl.store(o_part_ptr + slot[:, None] * D + offs_d[None, :],
                 out.to(o_part_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_part_ptr + slot, lse, mask=row_ok)


@triton.jit
def tree_attention_merge(o_part_ptr, lse_part_ptr, sched_ptr, out_ptr, splits_off,
                         HQ: tl.constexpr, D: tl.constexpr,
                         MAX_SPLITS: tl.constexpr):
    """Program (leaf, head): the leaf's sched[splits_off + leaf] split slots
    merged by their log-sum-exp; zeros for a leaf with none (a padding row)."""
    leaf = tl.program_id(0)
    head = tl.program_id(1)
    n = tl.load(sched_ptr + splits_off + leaf)
    s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, D)
    base = (leaf * HQ + head).to(tl.int64) * MAX_SPLITS
    ok = s < n
    lse = tl.load(lse_part_ptr + base + s, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    wgt = tl.where(ok, tl.exp2(lse - top), 0.0)
    o = tl.load(o_part_ptr + (base + s)[:, None] * D + offs_d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    total = tl.sum(wgt, 0)
    out = tl.sum(o * wgt[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (leaf * HQ + head).to(tl.int64) * D + offs_d,
             out.to(out_ptr.dtype.element_ty))

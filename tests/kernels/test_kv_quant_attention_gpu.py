"""The N-bit KV kernels on CUDA: decode attention against its torch twin on the same
pages, the quantize-on-write kernel against the torch writer, the backend's Triton
path against its torch path, and an int4 engine on CUDA."""

from __future__ import annotations

import pytest
import torch
from kv_quant_case import random_pages

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

pytest.importorskip("triton")


@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (3, None)])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128), (28, 4, 128), (8, 8, 64)])
@pytest.mark.parametrize("lens", [[1], [3000], [1, 17, 300, 64, 5], [129] * 40])
def test_kernel_matches_torch(bits, group, hq, hkv, d, lens):
    from dendrite.kernels.kv_quant_attention import (
        decode_attention,
        decode_attention_torch,
    )
    from dendrite.model.kv_quant import KVQuantFormat

    fmt = KVQuantFormat(bits, d, group)
    q, k, v, indptr, indices, lens_t = random_pages(fmt, lens, hq, hkv, 16, seed=len(lens),
                                                    device="cuda")
    ref = decode_attention_torch(q, k, v, indptr, indices, lens_t, fmt, d**-0.5)
    out = decode_attention(q, k, v, indptr, indices, lens_t, fmt, d**-0.5, max_kv_len=max(lens))
    torch.testing.assert_close(out, ref, atol=4e-3, rtol=4e-3)
    one = decode_attention(q, k, v, indptr, indices, lens_t, fmt, d**-0.5, max_kv_len=max(lens),
                           num_splits=1)
    torch.testing.assert_close(one, ref, atol=4e-3, rtol=4e-3)
    gather = decode_attention(q, k, v, indptr, indices, lens_t, fmt, d**-0.5,
                              max_kv_len=max(lens), contiguous=False)
    torch.testing.assert_close(gather, ref, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("bits,group,d", [(4, None, 64), (4, 32, 128), (3, None, 128)])
def test_write_kernel_matches_torch_writer(bits, group, d):
    from dendrite.kernels.kv_quant_write import write_rows
    from dendrite.model.kv_quant import KVQuantFormat, rotation_matrix

    fmt, m = KVQuantFormat(bits, d, group), rotation_matrix(d).cuda()
    hkv, t = 8, 300
    x = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16) * 4
    slots = torch.randperm(64 * 16, device="cuda")[:t]
    pages = torch.zeros(64, 16, hkv, fmt.row_bytes, dtype=torch.uint8, device="cuda")
    write_rows(x, slots, pages, m, fmt)
    got = pages.view(-1, hkv, fmt.row_bytes)[slots]
    ref = fmt.quantize(x.float() @ m)
    assert (got == ref).float().mean() > 0.99
    step = fmt.scales(ref)[0].amax()
    assert (fmt.dequantize(got) - fmt.dequantize(ref)).abs().max() <= step * 1.01


def test_backend_triton_vs_torch_mixed_step():
    """A step with decode and prefill rows: the Triton decode rows match the torch path."""
    from dendrite.attention.base import build_attention_metadata
    from dendrite.attention.quant_kv import QuantKVBackend
    from dendrite.model.kv_quant import KVQuantFormat
    from dendrite.model.kv_quant_cache import QuantKVCache

    hq, hkv, d, page = 16, 4, 128, 16
    fmt = KVQuantFormat(4, d)
    pool = QuantKVCache(1, 64, page, hkv, fmt, "cuda", dtype=torch.bfloat16)
    assert pool.triton_write
    lens, q_lens = [40, 200, 33, 1], [1, 1, 33, 1]
    pages, pos, slots, qo, kvp, last = 0, [], [], [0], [0], []
    for n, ql in zip(lens, q_lens):
        cnt = (n + page - 1) // page
        s = torch.arange(pages * page, pages * page + n, device="cuda")
        pool.write(0, s, torch.randn(n, hkv, d, device="cuda"), torch.randn(n, hkv, d,
                                                                            device="cuda"))
        pos += list(range(n - ql, n))
        slots += s[n - ql:].tolist()
        qo.append(qo[-1] + ql)
        kvp.append(kvp[-1] + cnt)
        last.append(n - (cnt - 1) * page)
        pages += cnt
    meta = build_attention_metadata(pos, slots, qo, kvp, list(range(pages)), last,
                                    page_size=page, device="cuda")
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    outs = []
    for use_triton in (True, False):
        be = QuantKVBackend(hq, hkv, d, fmt, pool.rotation, page, use_triton=use_triton)
        assert be.use_triton == use_triton
        be.plan(meta)
        outs.append(be.forward(0, q, *pool.layer(0)).float())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


def test_engine_int4_cuda(tmp_path):
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams
    from dendrite.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "m", "llama", seed=3, head_dim=64, hidden_size=128,
                             dtype="bfloat16")
    eng = Engine(model, device="cuda", num_pages=256, kv_dtype="int4")
    root = eng.new_sequence("one two three four five six seven")
    kids = root.fork(4)
    res = eng.generate(kids, [SamplingParams(temperature=0.0, max_tokens=24)] * 4)
    assert all(len(r.token_ids) == 24 for r in res)
    assert len({tuple(r.token_ids) for r in res}) == 1  # greedy forks agree
    for s in kids + [root]:
        s.release()
    eng.close()
    if eng.cache is not None:
        eng.cache.clear()
    assert eng.pool.used == 0

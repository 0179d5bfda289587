"""FP8 (e4m3) KV pages on the CPU: the format, the scales, the writers and
readers, and the engine on the tiny model (generate, fork, copy-on-write,
prefix cache, a failed request) against the model-dtype pool.

The FlashInfer and Triton readers and the fused writer are in
tests/attention/test_fp8_kv_gpu.py; the tree-attention kernel also runs in
Triton's interpreter (tests/kernels/test_tree_attention_interpreted.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dendrite.attention.base import build_attention_metadata
from dendrite.attention.reference import ReferenceBackend
from dendrite.engine import Engine, LeafTooLarge
from dendrite.kv import check_invariants
from dendrite.model.kv_cache import (
    FP8_E4M3_MAX,
    KV_DTYPES,
    KVCache,
    dequantize,
    kv_format,
    quantize,
)
from dendrite.model.kv_calibration import HEADROOM, scale_for
from dendrite.model.runner import ModelRunner, default_num_pages
from dendrite.sampling import SamplingParams
from dendrite.tiny_model import build_tiny_model

E4M3 = torch.float8_e4m3fn
PROMPT = "Question: Natalia sold clips to 48 of her friends in April, and then she sold"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fp8_model"), "llama", seed=3)


# -- the format ---------------------------------------------------------------------------


def test_round_trip_error_is_at_most_half_a_mantissa_step():
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 2.0**-7, 8.0):
        # magnitudes over the whole normal range of e4m3, both signs
        mag = torch.exp2(torch.empty(20000).uniform_(-6, math.log2(448), generator=g))
        x = mag * torch.sign(torch.randn(20000, generator=g)) * scale
        back = dequantize(quantize(x, scale), scale)
        rel = ((back - x).abs() / x.abs()).max().item()
        assert rel <= 2.0**-4 + 1e-7, (scale, rel)  # 3 mantissa bits: half a step is 2^-4
        # subnormals: absolute error at most half the subnormal step 2^-9
        tiny = torch.empty(1000).uniform_(-(2.0**-6), 2.0**-6, generator=g) * scale
        err = (dequantize(quantize(tiny, scale), scale) - tiny).abs().max().item()
        assert err <= 2.0**-10 * scale + 1e-12


def test_power_of_two_scales_store_the_same_bytes_as_prescaled_values():
    x = torch.randn(4096, dtype=torch.float32) * 3
    for k in (-7, -2, 3):
        s = 2.0**k
        assert torch.equal(quantize(x, s).view(torch.uint8),
                           quantize(x / s, 1.0).view(torch.uint8))


def test_stores_saturate_at_448_and_keep_nan():
    x = torch.tensor([1e6, -1e6, 449.0, 500.0, float("inf"), float("-inf"), float("nan"), 1.0])
    y = quantize(x, 1.0).float()
    assert y[:6].tolist() == [448.0, -448.0, 448.0, 448.0, 448.0, -448.0]
    assert math.isnan(y[6].item()) and y[7].item() == 1.0
    # with a scale, the saturation point scales too
    assert quantize(torch.tensor([1e9]), 0.25).float().item() == FP8_E4M3_MAX
    # bfloat16 inputs as the model writes them
    yb = quantize(torch.tensor([3e4, 0.3], dtype=torch.bfloat16), 1.0).float()
    assert yb[0].item() == 448.0 and abs(yb[1].item() - 0.3) <= 0.3 * 2**-4


def test_kv_format_names_and_errors():
    assert kv_format(None).name == kv_format("auto").name == "auto"
    fp8 = kv_format("fp8_e4m3")
    assert fp8.quantized and fp8.storage_dtype(torch.bfloat16) == E4M3
    assert kv_format("auto").storage_dtype(torch.bfloat16) == torch.bfloat16
    assert KV_DTYPES[:2] == ("auto", "fp8_e4m3")
    for bad in ("fp8", "FP8_E4M3", torch.float8_e4m3fn, 8, ""):
        with pytest.raises(ValueError, match="kv_dtype must be one of auto, fp8_e4m3"):
            kv_format(bad)


def test_scale_rule():
    top = FP8_E4M3_MAX / HEADROOM
    assert scale_for(1.0) == scale_for(top) == scale_for(17.0) == 1.0
    for bad in (0.0, float("nan"), float("inf"), -3.0):
        assert scale_for(bad) == 1.0
    for amax in (0.6, 0.01, top * 1.01, 1e4, 3e6):
        s = scale_for(amax)
        assert s != 1.0 and math.log2(s) == int(math.log2(s))  # a power of two
        assert top / 2 < amax / s <= top


# -- the pool: writes, copies, memory -----------------------------------------------------


def test_fp8_pool_takes_half_the_bytes_and_twice_the_default_pages(tiny):
    a = KVCache(3, 8, 16, 2, 16, torch.bfloat16, "cpu")
    b = KVCache(3, 8, 16, 2, 16, torch.bfloat16, "cpu", kv_dtype="fp8_e4m3")
    assert b.kv.dtype == E4M3 and b.dtype == torch.bfloat16
    assert b.nbytes * 2 == a.nbytes and b.bytes_per_token == 3 * 2 * 2 * 16
    from dendrite.model.loader import load_config

    cfg = load_config(tiny)
    cpu = torch.device("cpu")
    n16 = default_num_pages(cfg, 16, torch.bfloat16, cpu)
    n8 = default_num_pages(cfg, 16, E4M3, cpu)
    assert n8 == min(2 * n16, (1 << 18) // 16)


def test_write_quantizes_and_copy_pages_moves_bytes():
    torch.manual_seed(0)
    c = KVCache(2, 6, 4, 2, 8, torch.float32, "cpu", kv_dtype="fp8_e4m3")
    c.scales.set([0.5, 4.0], [2.0**-3, 1.0])
    k, v = torch.randn(5, 2, 8) * 20, torch.randn(5, 2, 8)
    slots = torch.tensor([0, 1, 2, 5, 9])
    c.write(1, slots, k, v)
    kc, vc = c.layer(1)
    kf, vf = kc.reshape(-1, 2, 8), vc.reshape(-1, 2, 8)
    assert torch.equal(kf[slots].view(torch.uint8), quantize(k, 4.0).view(torch.uint8))
    assert torch.equal(vf[slots].view(torch.uint8), quantize(v, 1.0).view(torch.uint8))
    before = c.kv.clone()
    c.copy_pages(np.array([[0, 3, 3], [2, 4, 2]], dtype=np.int32))
    flat = c.kv.view(torch.uint8).view(2, 2, -1, 2, 8)
    old = before.view(torch.uint8).view(2, 2, -1, 2, 8)
    assert torch.equal(flat[:, :, 12:15], old[:, :, 0:3])  # page 3 <- 3 slots of page 0
    assert torch.equal(flat[:, :, 16:18], old[:, :, 8:10])  # page 4 <- 2 slots of page 2
    assert torch.equal(flat[:, :, 15], old[:, :, 15])  # the rest untouched


def test_k_mean_is_subtracted_on_store_and_attention_does_not_see_it():
    """K is stored less k_mean; attention over those pages is attention over
    the keys with the mean added back (every score of a query moves by the
    same q . k_mean), with unit and non-unit scales."""
    torch.manual_seed(2)
    hq, hkv, d, ps, n_pages = 4, 2, 16, 4, 6
    n = n_pages * ps
    k = torch.randn(n, hkv, d) * 3
    mean = torch.randn(hkv, d) * 40  # a large offset, as real K has on some channels
    v = torch.randn(n, hkv, d)
    meta = build_attention_metadata([n - 3, n - 2, n - 1, n - 1], np.arange(n)[-4:] * 0,
                                    [0, 3, 4], [0, n_pages, 2 * n_pages],
                                    list(range(n_pages)) * 2, [ps, ps], page_size=ps,
                                    validate=False)
    q = torch.randn(4, hq, d)
    for ks in (1.0, 2.0**-2):
        c = KVCache(1, n_pages, ps, hkv, d, torch.float32, "cpu", kv_dtype="fp8_e4m3")
        c.scales.set([ks], [1.0])
        c.set_k_mean(mean[None])
        c.write(0, torch.arange(n), k + mean, v)
        stored = c.layer(0)[0].reshape(n, hkv, d)
        assert torch.equal(stored.view(torch.uint8), quantize(k + mean - mean, ks).view(torch.uint8))
        be = ReferenceBackend(hq, hkv, d, ps, kv_scales=c.scales)
        be.plan(meta)
        out = be.forward(0, q, *c.layer(0)).double()
        # float64 attention over the keys as written (mean included), the pages' rounding kept
        keys = dequantize(quantize(k, ks), ks).double() + mean.double()
        vals = dequantize(quantize(v, 1.0), 1.0).double()
        g = hq // hkv
        for row, (qi, kv_len) in enumerate(((0, n - 2), (1, n - 1), (2, n), (3, n))):
            s = torch.einsum("hd,thd->ht", q[qi].double(),
                             keys[:kv_len].repeat_interleave(g, 1)) / math.sqrt(d)
            want = torch.einsum("ht,thd->hd", s.softmax(-1), vals[:kv_len].repeat_interleave(g, 1))
            torch.testing.assert_close(out[qi], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k_mean must be finite with shape"):
        c.set_k_mean(torch.zeros(2, hkv, d))
    with pytest.raises(ValueError, match="quantized KV pools only"):
        KVCache(1, 2, 4, 1, 8, torch.float32, "cpu").set_k_mean(torch.zeros(1, 1, 8))


def test_bad_scales_are_refused():
    c = KVCache(2, 4, 4, 1, 8, torch.float32, "cpu", kv_dtype="fp8_e4m3")
    for k, v in (([1.0], [1.0, 1.0]), ([0.0, 1.0], [1.0, 1.0]),
                 ([1.0, float("nan")], [1.0, 1.0]), ([1.0, 1.0], [1.0, -2.0])):
        with pytest.raises(ValueError, match="scales"):
            c.scales.set(k, v)
    assert c.scales.k == [1.0, 1.0] and c.scales.v == [1.0, 1.0]


def test_reference_reads_fp8_pages_as_their_dequantized_values():
    """The reference on FP8 pages (non-unit scales) equals the reference on a
    float32 pool holding the dequantized values: decode and prefill rows."""
    torch.manual_seed(1)
    hq, hkv, d, ps, n_pages = 4, 2, 16, 4, 12
    f8 = KVCache(1, n_pages, ps, hkv, d, torch.float32, "cpu", kv_dtype="fp8_e4m3")
    f8.scales.set([2.0**-2], [8.0])
    f32 = KVCache(1, n_pages, ps, hkv, d, torch.float32, "cpu")
    slots = torch.arange(n_pages * ps)
    k, v = torch.randn(len(slots), hkv, d) * 30, torch.randn(len(slots), hkv, d) * 50
    f8.write(0, slots, k, v)
    f32.write(0, slots, dequantize(quantize(k, 0.25), 0.25), dequantize(quantize(v, 8.0), 8.0))
    # row 0 decodes 1 token over 7 tokens, row 1 prefills 5 over 10
    meta = build_attention_metadata([6, 5, 6, 7, 8, 9], [25, 41, 42, 43, 44, 45], [0, 1, 6],
                                    [0, 2, 5], [3, 5, 9, 10, 11], [3, 2], page_size=ps)
    q = torch.randn(6, hq, d)
    outs = []
    for cache, scales in ((f8, f8.scales), (f32, None)):
        be = ReferenceBackend(hq, hkv, d, ps, kv_scales=scales)
        be.plan(meta)
        outs.append(be.forward(0, q, *cache.layer(0)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


# -- the model and the engine -------------------------------------------------------------


def _prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    n, ps = len(ids), runner.page_size
    pages = -(-n // ps)
    meta = runner.build_metadata(np.arange(n), np.arange(n), np.array([0, n]),
                                 np.array([0, pages]), np.arange(pages),
                                 np.array([n - (pages - 1) * ps]))
    return runner.run(ids, meta, logits_indices=np.arange(n))


def test_fp8_logits_stay_close_to_the_float_pool(tiny):
    """Every position of a 40-token prefill, with unit scales and with scales
    that move every layer's stored values by powers of two (which must change
    nothing but the range). A stored element is off by at most 2^-4 of itself
    (RMS ~3.6%); on this model the logits move by a mean of 1.5% of their
    standard deviation (max 10%): allowed 3% and 15%. Where the float pool's
    top-1 margin exceeds the largest move, the top-1 token is the same."""
    base = ModelRunner(str(tiny), device="cpu", num_pages=8)
    r8 = ModelRunner(base.loaded, device="cpu", num_pages=8, kv_dtype="fp8_e4m3")
    ids = base.tokenizer.encode(PROMPT + " some more clips in May. How many clips")[:40]
    ref = _prefill_logits(base, ids)
    std = ref.std().item()
    n = r8.config.num_layers
    for k_scale, v_scale in ((1.0, 1.0), (2.0**-3, 2.0**2), (2.0**-6, 2.0**-6)):
        r8.kv_cache.scales.set([k_scale] * n, [v_scale] * n)
        got = _prefill_logits(r8, ids)
        err = (got - ref).abs()
        assert 0 < err.mean().item() <= 0.03 * std, (k_scale, err.mean().item(), std)
        assert err.max().item() <= 0.15 * std, (k_scale, err.max().item(), std)
        top2 = ref.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * err.max(-1).values
        assert decided.sum() >= len(ids) // 2
        assert torch.equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])


def test_calibrated_scales_and_memory_stats(tiny):
    e = Engine(str(tiny), device="cpu", num_pages=32, kv_dtype="fp8_e4m3")
    e16 = Engine(runner=e.runner)  # (a ready runner: its pool is reported)
    try:
        r = e.runner
        assert r.kv_dtype == "fp8_e4m3" and r.kv_cache.kv.dtype == E4M3
        cal = r.kv_scale_calibration
        assert len(cal.k_amax) == r.config.num_layers
        assert r.kv_cache.scales.k == [scale_for(a) for a in cal.k_amax]
        assert r.kv_cache.scales.v == [scale_for(a) for a in cal.v_amax]
        assert torch.equal(r.kv_cache.k_mean, cal.k_mean)
        assert r.kv_cache.k_mean.shape == (r.config.num_layers, r.config.num_kv_heads,
                                           r.config.head_dim)
        stats = e.memory_stats()
        cfg = r.config
        assert stats["kv_dtype"] == "fp8_e4m3"
        assert stats["kv_bytes_per_token"] == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
        assert stats["bytes_per_page"] == stats["kv_bytes_per_token"] * 16
        assert e16.memory_stats() == stats
    finally:
        e.close()


def test_fp8_engine_generates_forks_copies_and_reuses_the_prefix_cache(tiny):
    e = Engine(str(tiny), device="cpu", num_pages=64, kv_dtype="fp8_e4m3")
    copied = []
    copy_pages = e.runner.kv_cache.copy_pages

    def spy(rows):  # (records the copy-on-write rows, then runs them)
        copied.extend(np.asarray(rows).reshape(-1, 3).tolist())
        copy_pages(rows)

    e.runner.kv_cache.copy_pages = spy
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=6, ignore_eos=True)
              for i in range(3)]
    try:
        root = e.new_sequence(PROMPT)
        assert root.num_tokens % e.page_size  # its last page is partly filled
        kids = root.fork(3)
        first = [r.token_ids for r in e.generate(kids, params)]
        assert copied  # the kids' first writes copied the shared last page
        # a kid draws what an unforked run with its seed draws
        solo = e.new_sequence(PROMPT)
        assert e.generate([solo], [params[1]])[0].token_ids == first[1]
        for s in (*kids, root, solo):
            s.release()
        # a prompt served from the prefix cache (FP8 pages as stored) gives the same tokens
        cached = e.new_sequence(PROMPT)
        assert cached.num_cached > 0
        assert e.generate([cached], [params[2]])[0].token_ids == first[2]
        cached.release()
        check_invariants(e.pool, [e.tree], [e.cache])
    finally:
        e.close()
        e.cache.clear()
    assert e.pool.used == 0


def test_fp8_engine_greedy_matches_the_float_engine_on_decided_tokens(tiny):
    """Greedy decode of 12 tokens: tokens equal the float pool's up to the first
    position where the float engine's top-2 logprobs are closer than the
    logits may move (0.5: 0.15 x their std of ~3.1, the bound of the test above)."""
    outs = []
    for kv in (None, "fp8_e4m3"):
        e = Engine(str(tiny), device="cpu", num_pages=32, kv_dtype=kv)
        try:
            s = e.new_sequence(PROMPT)
            outs.append(e.generate([s], [SamplingParams(temperature=0.0, max_tokens=12,
                                                        ignore_eos=True, logprobs=2)])[0])
        finally:
            e.close()
    f32, f8 = outs
    for i, (a, b) in enumerate(zip(f32.token_ids, f8.token_ids)):
        if a != b:  # a flip is allowed only where the float engine's top-2 were close
            top = sorted((lp for _, lp in f32.top_logprobs[i]), reverse=True)
            assert top[0] - top[1] < 0.5, (i, top)
            break


def test_failed_request_leaks_no_fp8_pages(tiny):
    e = Engine(str(tiny), device="cpu", num_pages=4, prefix_cache=False,
               kv_dtype="fp8_e4m3")
    try:
        ok = e.new_sequence("fox jumps")
        big = e.new_sequence(" ".join(["fox"] * 200))
        h_ok = e.submit(ok, SamplingParams(max_tokens=3, ignore_eos=True))
        h_big = e.submit(big, SamplingParams(max_tokens=3))
        with pytest.raises(LeafTooLarge):
            e.run([h_ok, h_big])
        assert h_big.result.finish_reason == "error"
        e.run([h_ok])
        assert len(h_ok.result.token_ids) == 3
        big.release()
        ok.release()
        assert e.pool.used == 0
        check_invariants(e.pool, [e.tree], [])
    finally:
        e.close()


def test_bad_kv_dtype_fails_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"  # never read: the argument is checked first
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, fp8_e4m3.*'int2'"):
        Engine(str(missing), device="cpu", kv_dtype="int2")
    with pytest.raises(ValueError, match="kv_dtype"):
        ModelRunner(str(missing), device="cpu", kv_dtype="bf16")
    with pytest.raises(ValueError, match="kv_dtype='fp8_e4m3' with tensor_parallel > 1"):
        Engine(str(missing), device="cpu", kv_dtype="fp8_e4m3", tensor_parallel=2)


def test_a_ready_backend_without_fp8_support_is_refused(tiny):
    class Plain:
        def plan(self, meta):
            pass

        def forward(self, layer, q, k, v):
            return q

    with pytest.raises(ValueError, match="kv_dtype='fp8_e4m3' needs an attention backend"):
        ModelRunner(str(tiny), device="cpu", num_pages=8, attention=Plain(),
                    kv_dtype="fp8_e4m3")
    cfg = ModelRunner(str(tiny), device="cpu", num_pages=8).config
    ref = ReferenceBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16)
    r = ModelRunner(str(tiny), device="cpu", num_pages=8, attention=ref, kv_dtype="fp8_e4m3")
    assert ref.kv_scales is r.kv_cache.scales

"""The fused CUDA sampling kernel against the torch sampler it replaces (GPU).

Tokens must be the torch sampler's exactly: same masked logits, same
temperature division, same counter-based Gumbel noise, ties to the lowest id.
Logprobs agree up to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("triton")

from dendrite.kernels.config import KernelConfig  # noqa: E402
from dendrite.kernels.sample import fused_sampling_available  # noqa: E402
from dendrite.sampling import Sampler, SamplingParams, gumbel_noise, row_keys  # noqa: E402


def _reference(logits, params, positions, allowed):
    """The torch sampler on the same rows (the fused kernel turned off)."""
    torch_only = Sampler(seed=0, kernels=KernelConfig(fused_sampling=False))
    assert not torch_only._fusable(logits, params, None, allowed)
    return torch_only(logits, params, positions, allowed=allowed)


def _params(b: int, gen: torch.Generator) -> list[SamplingParams]:
    temps = [0.0, 1.0, 0.7, 1.5, 0.05]
    return [SamplingParams(temperature=temps[i % len(temps)],
                           seed=int(torch.randint(0, 2**62, (1,), generator=gen)))
            for i in range(b)]


@pytest.mark.parametrize("vocab", [1000, 32000, 128256, 151936])
@pytest.mark.parametrize("batch", [1, 7, 16, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_tokens_equal_torch_sampler(vocab, batch, masked):
    assert fused_sampling_available()
    gen = torch.Generator().manual_seed(vocab * 100 + batch)
    logits = (torch.randn(batch, vocab, generator=gen) * 4).cuda()
    params = _params(batch, gen)
    positions = torch.randint(0, 100_000, (batch,), generator=gen).tolist()
    allowed = None
    if masked:
        words = (vocab - 40 + 31) // 32  # narrower than the vocabulary: the tail is disallowed
        allowed = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32,
                                generator=gen)
        allowed[0] = 0
        allowed[0, 3] = 1 << 5  # one allowed token: row 0 must pick it, at any temperature
    got = Sampler(seed=0)(logits, params, positions, allowed=allowed)
    ref = _reference(logits, params, positions, allowed)
    assert got.token_ids.tolist() == ref.token_ids.tolist()
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=2e-5)
    if masked:
        assert int(got.token_ids[0]) == 3 * 32 + 5
        assert (got.token_ids < 32 * allowed.shape[1]).all()


def test_sampled_rows_follow_the_gumbel_argmax():
    """Direct check of the noise: token = argmax(logits / T + gumbel(key))."""
    gen = torch.Generator().manual_seed(3)
    b, vocab = 12, 50000
    logits = (torch.randn(b, vocab, generator=gen) * 2).cuda()
    params = [SamplingParams(temperature=0.8, seed=1000 + i) for i in range(b)]
    positions = list(range(40, 40 + b))
    got = Sampler()(logits, params, positions)
    keys = row_keys([p.seed for p in params], positions)
    want = (logits / 0.8 + gumbel_noise(keys, vocab, "cuda")).argmax(-1)
    assert got.token_ids.tolist() == want.tolist()
    lp = torch.log_softmax(logits, -1).gather(1, want[:, None]).squeeze(1)
    torch.testing.assert_close(got.logprobs, lp, rtol=1e-5, atol=2e-5)


def test_greedy_ties_go_to_lowest_id():
    logits = torch.zeros(3, 20000, device="cuda")
    logits[0, [7, 9000, 15000]] = 5.0
    logits[1, [12345, 19999]] = 5.0
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * 3, [0, 0, 0])
    assert out.token_ids.tolist() == [7, 12345, 0]


def test_draw_does_not_depend_on_batch_composition():
    """A row's token and logprob are the same alone and inside any batch."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(9, 128256, generator=gen) * 3).cuda()
    params = [SamplingParams(temperature=1.0, seed=77 + i) for i in range(9)]
    positions = list(range(9))
    full = Sampler()(logits, params, positions)
    for r in (0, 4, 8):
        alone = Sampler()(logits[r:r + 1], params[r:r + 1], positions[r:r + 1])
        assert int(alone.token_ids[0]) == int(full.token_ids[r])
        assert float(alone.logprobs[0]) == float(full.logprobs[r])


def test_unfusable_params_take_the_torch_path():
    logits = torch.randn(2, 1000, device="cuda")
    params = [SamplingParams(temperature=1.0, top_k=5, seed=1), SamplingParams(seed=2)]
    s = Sampler()
    assert not s._fusable(logits, params, None, None)
    assert s._fusable(logits, [SamplingParams(logprobs=2)], None, None)  # top-n: still fused
    assert s._fusable(logits, [SamplingParams(seed=1)] * 2, None, None)
    assert not s._fusable(logits.cpu(), [SamplingParams(seed=1)] * 2, None, None)
    off = Sampler(kernels=KernelConfig(fused_sampling=False))
    assert not off._fusable(logits, [SamplingParams(seed=1)] * 2, None, None)


@pytest.mark.parametrize("masked", [False, True])
def test_top_logprobs_on_the_fused_path(masked):
    """Rows asking for top-n alternatives keep the fused kernel (the rest of
    the batch too): tokens are the torch sampler's, and the alternatives are
    log_softmax(...).topk of the raw logits, for the asking rows only."""
    gen = torch.Generator().manual_seed(9)
    b, vocab = 8, 128256
    logits = (torch.randn(b, vocab, generator=gen) * 3).cuda()
    counts = [0, 5, 0, 1, 20, 0, 3, 0]
    params = [SamplingParams(temperature=[0.0, 1.0, 0.7][i % 3], seed=50 + i, logprobs=n)
              for i, n in enumerate(counts)]
    allowed = None
    if masked:
        allowed = torch.randint(-2**31, 2**31 - 1, (b, vocab // 32), dtype=torch.int32,
                                generator=gen)
    positions = list(range(100, 100 + b))
    s = Sampler(seed=0)
    assert s._fusable(logits, params, None, allowed)
    got = s(logits, params, positions, allowed=allowed)
    ref = _reference(logits, params, positions, allowed)
    assert got.token_ids.tolist() == ref.token_ids.tolist()
    assert got.top_token_ids.shape == (b, 20)
    want_lp, want_ids = torch.log_softmax(logits, -1).topk(20, dim=-1)
    for r, n in enumerate(counts):
        assert got.top_token_ids[r, :n].tolist() == want_ids[r, :n].tolist()
        torch.testing.assert_close(got.top_logprobs[r, :n], want_lp[r, :n])
        assert (got.top_token_ids[r, n:] == -1).all()
    assert torch.equal(got.top_token_ids, ref.top_token_ids)

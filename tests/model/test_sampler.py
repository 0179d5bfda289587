"""Sampler: per-row parameters, seeded determinism, filters vs transformers, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.grammar import unpack_bitmask
from dendrite.sampling import (
    Sampler,
    SamplingParams,
    fusable_params,
    gumbel_noise,
    row_keys,
    sample,
    top_logprobs,
)

V = 300


def rand_logits(b: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


def test_greedy_is_argmax_and_ignores_seed():
    x = rand_logits(4)
    out = sample(x, [SamplingParams(temperature=0.0, seed=s) for s in range(4)], [0, 1, 2, 3])
    assert torch.equal(out.token_ids, x.argmax(-1))


def test_draw_depends_only_on_seed_position_and_logits():
    x = rand_logits(6, seed=1)
    mixed = [
        SamplingParams(temperature=0.7, seed=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=20, seed=6),
        SamplingParams(temperature=0.7, seed=5),
        SamplingParams(top_p=0.5, seed=8),
        SamplingParams(min_p=0.1, repetition_penalty=1.3, seed=9),
    ]
    pos = [10, 11, 12, 10, 14, 15]
    prev = [[1, 2]] * 6
    # Rows 0 and 3 have identical (seed, position, logits) -> identical draws.
    x[3] = x[0]
    full = Sampler()(x, mixed, pos, prev_tokens=prev).token_ids
    assert full[0] == full[3]
    # Each row alone, and the batch reversed, give the same tokens.
    for r in range(6):
        alone = Sampler()(x[r : r + 1], [mixed[r]], [pos[r]], prev_tokens=[prev[r]]).token_ids
        assert alone[0] == full[r]
    rev = Sampler()(x.flip(0), mixed[::-1], pos[::-1], prev_tokens=prev).token_ids
    assert torch.equal(rev.flip(0), full)


def test_seed_and_position_change_the_draw():
    x = torch.zeros(64, V)  # uniform: the draw is pure noise
    same = sample(x, [SamplingParams(seed=3)] * 64, [7] * 64).token_ids
    assert (same == same[0]).all()
    by_pos = sample(x, [SamplingParams(seed=3)] * 64, list(range(64))).token_ids
    by_seed = sample(x, [SamplingParams(seed=s) for s in range(64)], [7] * 64).token_ids
    assert len(set(by_pos.tolist())) > 40 and len(set(by_seed.tolist())) > 40
    unseeded = sample(x, [SamplingParams()] * 64, [7] * 64).token_ids
    assert len(set(unseeded.tolist())) > 40


def test_noise_is_counter_based_and_gumbel():
    keys = row_keys([1, 2], [0, 0])
    a = gumbel_noise(keys, 4096, "cpu")
    assert torch.equal(a, gumbel_noise(keys, 4096, "cpu"))
    assert torch.equal(a[:, :100], gumbel_noise(keys, 100, "cpu"))  # independent of V
    # Standard Gumbel: mean = Euler-Mascheroni, variance = pi^2 / 6.
    assert abs(a.mean().item() - 0.5772) < 0.05
    assert abs(a.var().item() - np.pi**2 / 6) < 0.15


def test_frequencies_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    p = torch.softmax(logits / 0.8, -1)
    toks = sample(
        logits.expand(n, -1), [SamplingParams(temperature=0.8, seed=s) for s in range(n)], [0] * n
    ).token_ids
    freq = torch.bincount(toks, minlength=6).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * sigma + 1e-4).all(), (freq, p)


def _hf_filtered(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.zeros(1, 1, dtype=torch.long)
    s = TemperatureLogitsWarper(p.temperature)(ids, x[None].clone())
    if p.top_k > 0:
        s = TopKLogitsWarper(p.top_k)(ids, s)
    if p.top_p < 1:
        s = TopPLogitsWarper(p.top_p)(ids, s)
    if p.min_p > 0:
        s = MinPLogitsWarper(p.min_p)(ids, s)
    return torch.isfinite(s[0])


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=1.2, top_k=40, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.05),
        SamplingParams(temperature=1.5, top_k=50, top_p=0.9, min_p=0.02),
    ],
)
def test_filters_keep_the_same_tokens_as_transformers(p):
    pytest.importorskip("transformers")
    from dendrite.sampling import _filter

    x = rand_logits(8, seed=2)
    # Batched with neutral rows: per-row parameters must not leak across rows.
    params = [p, SamplingParams(), p, SamplingParams(top_k=3), p, p, p, p]
    kept = torch.isfinite(
        _filter(x / torch.tensor([q.temperature for q in params])[:, None], params)
    )
    for r in (0, 2, 4):
        assert torch.equal(kept[r], _hf_filtered(x[r], p))
    assert kept[1].all() and kept[3].sum() == 3
    # Samples only ever come from the kept set.
    toks = sample(
        x[:1].expand(500, -1),
        [SamplingParams(**{**_kw(p), "seed": s}) for s in range(500)],
        [0] * 500,
    ).token_ids
    assert kept[0][toks].all()


def _kw(p: SamplingParams) -> dict:
    return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p}


def test_repetition_penalty_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = rand_logits(2, seed=3)
    prev = [[5, 9, 9, 250, 17], [1, 2, 3]]
    from dendrite.sampling import _apply_repetition_penalty

    ours = _apply_repetition_penalty(
        x, [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=1.0)], prev
    )
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prev[0]]), x[:1].clone())
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], x[1])
    # Greedy honours the penalty: penalising the argmax moves it.
    top = int(x[0].argmax())
    out = sample(
        x[:1], [SamplingParams(temperature=0.0, repetition_penalty=100.0)], [0], prev_tokens=[[top]]
    )
    assert int(out.token_ids[0]) != top


def _pack(allowed: np.ndarray) -> torch.Tensor:
    """bool [B, V] -> llguidance's int32 words, bit j of word w = token 32 w + j."""
    b, v = allowed.shape
    w = (v + 31) // 32
    bits = np.zeros((b, w * 32), dtype=np.uint64)
    bits[:, :v] = allowed
    words = (bits.reshape(b, w, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def test_packed_bitmask_matches_llguidance_layout():
    rng = np.random.default_rng(0)
    allowed = rng.random((3, V)) < 0.1
    packed = _pack(allowed)
    assert packed.shape == (3, (V + 31) // 32)
    assert torch.equal(unpack_bitmask(packed, V), torch.from_numpy(allowed))
    llg = pytest.importorskip("llguidance.numpy")
    logits = rand_logits(3, seed=4).numpy().copy()
    llg.apply_token_bitmask_inplace(logits, packed.numpy())
    assert np.array_equal(np.isfinite(logits), allowed)
    # Tokens past the mask's width are disallowed (a model vocab padded past the tokenizer's).
    short = unpack_bitmask(packed[:, :2], V)
    assert not short[:, 64:].any() and torch.equal(short[:, :64], torch.from_numpy(allowed[:, :64]))


def test_mask_constrains_greedy_and_sampled_rows():
    rng = np.random.default_rng(1)
    allowed = rng.random((4, V)) < 0.05
    allowed[:, 7] = True
    x = rand_logits(4, seed=5)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1),
        SamplingParams(top_k=2, seed=2),
        SamplingParams(top_p=0.5, seed=3),
    ]
    for mask in (_pack(allowed), torch.from_numpy(allowed)):
        out = sample(x, params, [0, 1, 2, 3], allowed=mask)
        assert allowed[np.arange(4), out.token_ids.numpy()].all()
    best_allowed = x.masked_fill(~torch.from_numpy(allowed), float("-inf")).argmax(-1)
    assert int(out.token_ids[0]) == int(best_allowed[0])


def test_logprobs_are_the_models():
    x = rand_logits(3, seed=6)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(seed=1, logprobs=2),
        SamplingParams(temperature=0.5, seed=2, top_k=3),
    ]
    out = sample(x, params, [0, 0, 0])
    lp = torch.log_softmax(x, -1)
    assert torch.allclose(out.logprobs, lp.gather(1, out.token_ids[:, None])[:, 0])
    # [B, most asked]: each row its own count of the model's best, then (-1, -inf).
    assert out.top_token_ids.shape == out.top_logprobs.shape == (3, 5)
    ref_lp, ref_ids = lp.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids[0], ref_ids[0])
    assert torch.allclose(out.top_logprobs[0], ref_lp[0])
    assert torch.equal(out.top_token_ids[1, :2], ref_ids[1, :2])
    assert torch.allclose(out.top_logprobs[1, :2], ref_lp[1, :2])
    assert (out.top_token_ids[1, 2:] == -1).all() and (out.top_token_ids[2] == -1).all()
    assert torch.isneginf(out.top_logprobs[1, 2:]).all() and torch.isneginf(out.top_logprobs[2]).all()
    assert sample(x, [SamplingParams()] * 3, [0, 0, 0]).top_token_ids is None


@pytest.mark.parametrize("seed", range(4))
def test_top_logprobs_are_log_softmax_topk_of_the_raw_logits(seed):
    """Penalties, masks, temperature and filters change the draw, never the
    reported alternatives: they are the model's distribution."""
    rng = np.random.default_rng(seed)
    b = 6
    x = rand_logits(b, seed=10 + seed, scale=5.0)
    counts = [0, 1, 3, 20, V + 7, 2]  # V + 7: the whole vocabulary, no more
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.5])), seed=i,
                             logprobs=n, top_k=int(rng.choice([-1, 5])),
                             repetition_penalty=float(rng.choice([1.0, 1.3])))
              for i, n in enumerate(counts)]
    allowed = rng.random((b, V)) < 0.3
    allowed[:, 0] = True
    out = Sampler(seed=0)(x, params, list(range(b)), prev_tokens=[[1, 2, 3]] * b,
                          allowed=_pack(allowed))
    ref = torch.log_softmax(x, -1)
    assert out.top_token_ids.shape == (b, V)
    for r, n in enumerate(counts):
        n = min(n, V)
        want_lp, want_ids = ref[r].topk(n) if n else (ref[r, :0], ref[r, :0].long())
        assert out.top_token_ids[r, :n].tolist() == want_ids.tolist()
        torch.testing.assert_close(out.top_logprobs[r, :n], want_lp)
        assert (out.top_token_ids[r, n:] == -1).all()
    # The function on its own (the fused sampler's path: from the asking rows' logits).
    ids, lps = top_logprobs(x, params)
    assert torch.equal(ids, out.top_token_ids)
    torch.testing.assert_close(lps, out.top_logprobs)
    assert top_logprobs(x, [SamplingParams()] * b) == (None, None)


def test_top_logprobs_do_not_turn_the_fused_sampler_off():
    vocab = 1000
    assert fusable_params([SamplingParams(logprobs=5), SamplingParams(seed=3)], vocab)
    assert fusable_params([SamplingParams(temperature=0.0, logprobs=20)], vocab)
    for kw in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"repetition_penalty": 1.2}):
        assert not fusable_params([SamplingParams(logprobs=2), SamplingParams(**kw)], vocab)
    assert fusable_params([SamplingParams(top_k=vocab)], vocab)  # top-k of everything: off
    # The kernel needs CUDA: a CPU batch takes the torch path whatever the config.
    logits = torch.zeros(2, vocab)
    assert not Sampler()._fusable(logits, [SamplingParams(logprobs=1)] * 2, None, None)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"logprobs": -1},
        {"seed": 1.5},
    ],
)
def test_invalid_params_are_rejected(kw):
    with pytest.raises((ValueError, TypeError)):
        SamplingParams(**kw)


def test_params_normalise_stop():
    assert SamplingParams(stop="\n").stop_strings == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams().stop_strings == ()


def test_gumbel_noise_is_finite_for_every_hash_value():
    """Every possible uniform draw maps to finite noise (u never rounds to 0 or 1)."""
    from dendrite.sampling import gumbel_noise

    noise = gumbel_noise(list(range(64)), 128256, "cpu")
    assert torch.isfinite(noise).all()
    top = ((torch.tensor([(1 << 23) - 1], dtype=torch.float32) + 0.5) * (1.0 / (1 << 23)))
    assert top.item() < 1.0


def test_masked_tokens_never_sampled_with_large_vocab():
    from dendrite.sampling import SamplingParams, sample

    vocab = 128256
    logits = torch.randn(32, vocab)
    allowed = torch.zeros(32, (vocab + 31) // 32, dtype=torch.int32)
    allowed[:, :16] = -1  # only the first 512 ids
    for step in range(20):
        out = sample(logits, [SamplingParams(temperature=1.0, seed=s) for s in range(32)],
                     [step] * 32, allowed=allowed)
        assert (out.token_ids < 512).all()

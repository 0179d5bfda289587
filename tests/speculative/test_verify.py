"""Rejection sampling on synthetic distributions: the output is distributed as p."""

import pytest
import torch

from dendrite.speculative.tree import DraftTree
from dendrite.speculative.verify import (
    recursive_rejection_sample,
    rejection_sample_chain,
    residual,
    seeded_uniforms,
    walk,
)

scipy_stats = pytest.importorskip("scipy.stats")

P = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1], dtype=torch.float64)
Q = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.1], dtype=torch.float64)
N = 2000


def _draw(q, u):
    return int(torch.searchsorted(torch.cumsum(q, 0), torch.tensor([u], dtype=q.dtype)).item())


def test_residual_is_normalized_positive_part():
    r = residual(P, Q)
    want = (P - Q).clamp_min(0)
    torch.testing.assert_close(r, want / want.sum())
    torch.testing.assert_close(residual(P, P), P)  # p == q: nothing left, p itself


def test_point_mass_acceptance_is_exactly_p_of_the_candidate():
    """q one-hot at c: accepted for u < p(c); over an even grid of u the accepted
    share is p(c) up to the grid step."""
    c, grid = 2, 2000
    onehot = torch.zeros(5, dtype=torch.float64)
    onehot[c] = 1
    acc = 0
    for i in range(grid):
        u = torch.tensor([(i + 0.5) / grid, 0.5], dtype=torch.float64)
        idx, tok = recursive_rejection_sample(P, [c], [onehot], u)
        acc += idx == 0
        if idx < 0:
            assert tok != c  # the residual excludes the rejected candidate
    assert abs(acc / grid - float(P[c])) <= 1 / grid


def test_chain_first_token_is_distributed_as_p():
    counts = torch.zeros(5)
    accepted = 0
    for i in range(N):
        u = seeded_uniforms(i, 0, 4)
        d = _draw(Q, float(u[3]))  # the draft token, drawn from q
        n, tok = rejection_sample_chain(P[None].expand(2, 5), Q[None], [d], u)
        first = d if n == 1 else tok
        counts[first] += 1
        accepted += n
    assert scipy_stats.chisquare(counts.numpy(), (P * N).numpy()).pvalue > 1e-3
    # Acceptance rate is sum(min(p, q)) (Leviathan et al., Theorem 3.5).
    assert abs(accepted / N - float(torch.minimum(P, Q).sum())) < 0.03


def test_recursive_multi_candidate_is_distributed_as_p():
    q2 = torch.tensor([0.1, 0.1, 0.1, 0.6, 0.1], dtype=torch.float64)
    counts = torch.zeros(5)
    for i in range(N):
        u = seeded_uniforms(i, 1, 5)
        cands = [_draw(Q, float(u[3])), _draw(q2, float(u[4]))]
        _, tok = recursive_rejection_sample(P, cands, [Q, q2], u)
        counts[tok] += 1
    assert scipy_stats.chisquare(counts.numpy(), (P * N).numpy()).pvalue > 1e-3


def test_seeded_uniforms_are_a_function_of_seed_and_position():
    a = seeded_uniforms(5, 10, 8)
    assert torch.equal(a, seeded_uniforms(5, 10, 8))
    assert not torch.equal(a, seeded_uniforms(5, 11, 8))
    assert ((a > 0) & (a < 1)).all()


def test_seeded_uniforms_are_the_gumbel_noise_uniforms():
    """The host (numpy) hash is the sampler's torch hash: the uniform under
    `gumbel_noise` for the salted key, bit for bit."""
    from dendrite.sampling import _mix32, row_keys
    from dendrite.speculative.verify import _SALT

    for seed, pos, n in [(0, 0, 1), (5, 10, 8), (2**64 - 1, 123456, 5), (2**40 + 7, 3, 3)]:
        key = row_keys([seed ^ _SALT], [pos])[0]
        k = torch.tensor([[key & 0xFFFFFFFF, key >> 32]], dtype=torch.int64)
        h = _mix32(_mix32(torch.arange(n, dtype=torch.int64)[None] ^ k[:, :1]) ^ k[:, 1:])
        want = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
        assert torch.equal(seeded_uniforms(seed, pos, n), want[0])
    # Batched (the model drafter's draws): each request's run is its own.
    from dendrite.speculative.verify import uniforms_many

    got = uniforms_many([3, 2**63 + 1, 3], [0, 7, 1], [2, 4, 1])
    want = torch.cat([seeded_uniforms(3, 0, 2), seeded_uniforms(2**63 + 1, 7, 4),
                      seeded_uniforms(3, 1, 1)])
    assert torch.equal(torch.from_numpy(got), want)


def test_walk_follows_the_target_tokens():
    t = DraftTree()
    a = t.add(-1, 10)
    b = t.add(-1, 11)
    c = t.add(a, 20)
    t.add(b, 21)
    target = {-1: 10, a: 20, c: 99}
    assert walk(t, target.__getitem__) == ([a, c], 99)
    assert walk(t, {-1: 12}.__getitem__) == ([], 12)


def test_chain_output_distribution_is_p_on_a_grid_of_uniforms():
    """The first emitted token's distribution, integrated over an even grid of
    each uniform (accept test, residual draw) and summed over the draft token
    x ~ q: equal to p up to the grid step — an exact expectation, no sampling."""
    grid = 400
    us = [(i + 0.5) / grid for i in range(grid)]
    out = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        accepted = 0
        residual_counts = torch.zeros(5, dtype=torch.float64)
        for u in us:
            n, _ = rejection_sample_chain(P[None].expand(2, 5), Q[None], [x],
                                          torch.tensor([u, 0.5, 0.5], dtype=torch.float64))
            accepted += n
        a = accepted / grid
        assert abs(a - min(1.0, float(P[x] / Q[x]))) <= 1 / grid
        if a < 1:
            for u in us:  # force the rejection, draw the correction with u
                n, tok = rejection_sample_chain(P[None].expand(2, 5), Q[None], [x],
                                                torch.tensor([1 - 1e-12, u, 0.5],
                                                             dtype=torch.float64))
                assert n == 0
                residual_counts[tok] += 1 / grid
        out[x] += float(Q[x]) * a
        out += float(Q[x]) * (1 - a) * residual_counts
    torch.testing.assert_close(out, P, atol=3 / grid, rtol=0)

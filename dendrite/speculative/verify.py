"""Verification: which draft tokens the target model accepts, exactly.

Speculative sampling must leave the target distribution p untouched. Two
schemes, both exact:

* Rejection sampling with draft distributions q (Leviathan et al. 2023,
  "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
  2023): a chain's draft token x ~ q is accepted with probability
  min(1, p(x) / q(x)), else the token is drawn from norm(max(p - q, 0)) and
  the chain stops (`rejection_sample_chain`). For a tree, the children of a
  node are tried one after another with the residual updated after each
  rejection, and the final fallback draws from what is left: the
  multi-candidate "recursive rejection sampling" of SpecInfer (Miao et al.
  2024, "SpecInfer: Accelerating Large Language Model Serving with Tree-based
  Speculative Inference and Verification", Algorithm 2), which keeps the
  output distribution exactly p (`recursive_rejection_sample`).
* Point-mass drafts (the drafter proposes tokens, q = one-hot: prompt
  lookup, a greedy draft model, top-k children of a node): the recursive
  scheme then reduces to "draw t ~ p; if t is one of the candidates, follow
  it". Candidate c1 is accepted with probability p(c1), the residual is p
  without c1, and so on: drawing t from p once and looking it up among the
  children is the same distribution. The engine does exactly that with its
  own sampler (`walk`): every tree node's target token is drawn by the
  engine's seeded Gumbel-max sampler at that node's absolute position, so a
  speculative run emits token for token what a non-speculative run with the
  same seed emits, greedy or sampled, and the per-row seeds, penalties,
  top-k/p and grammar masks apply unchanged.

Drafts drawn from a draft distribution (`DraftTree.dists`, a model drafter
with a temperature) go through `recursive_rejection_sample` in the engine's
speculative step, for sampling branches without a grammar; everything else
through the walk.

Uniform draws are counter-based (`seeded_uniforms`): a pure function of
(seed, position, index), as the sampler's Gumbel noise is, so a run is
reproducible given its seed whatever the batch.

The rejection functions read single values (`float(p[x])`, one per test):
give them host tensors. On a GPU each read of a device tensor is a
device->host transfer and a wait; the engine's step copies the few
distributions it needs to the host in its one transfer per step and runs
these functions there (dendrite/speculative/step.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dendrite.sampling import row_keys
from dendrite.speculative.tree import DraftTree

__all__ = [
    "prune_by_grammar",
    "recursive_rejection_sample",
    "rejection_sample_chain",
    "residual",
    "seeded_uniforms",
    "uniforms_many",
    "walk",
]


def walk(tree: DraftTree, target_token: Callable[[int], int]) -> tuple[list[int], int]:
    """Follow the target's tokens down the tree (point-mass drafts, see above).

    `target_token(node)` is the token the target draws after `node` (-1: the
    root). Returns (the accepted draft nodes, root first; the token drawn
    after the last of them), so `len(nodes) + 1` tokens are emitted."""
    accepted: list[int] = []
    node = -1
    while True:
        tok = target_token(node)
        child = tree.child_with_token(node, tok)
        if child is None:
            return accepted, tok
        accepted.append(child)
        node = child


_SALT = 0x5EC0_DE00_0000_0001  # keys differ from the sampler's for the same seed
_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x: np.ndarray) -> np.ndarray:
    """`dendrite.sampling._mix32` ("lowbias32") on uint64 arrays of 32-bit values:
    the products of two 32-bit values fit in 64 bits, so this is exact."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def seeded_uniforms(seed: int, position: int, n: int, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
    """`n` float32 uniforms in (0, 1), a pure function of (seed, position, index).

    The uniforms under the sampler's Gumbel noise (`gumbel_noise`) for the
    key of (seed ^ salt, position): 23 hashed bits + 0.5, exactly
    representable. Computed on the host with numpy: a verify step needs a
    few per tree node, where torch's per-op overhead cost 0.13 ms a call."""
    t = torch.from_numpy(uniforms_many([seed], [position], [n]))
    return t if torch.device(device).type == "cpu" else t.to(device)


def uniforms_many(seeds: Sequence[int], positions: Sequence[int], counts: Sequence[int]
                  ) -> np.ndarray:
    """`seeded_uniforms(seeds[i], positions[i], counts[i])` for every i, concatenated
    (float32 numpy), in one vectorized pass."""
    keys = np.asarray(row_keys([s ^ _SALT for s in seeds], positions), dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    v = (np.arange(int(counts.sum())) - np.repeat(starts, counts)).astype(np.uint64)
    key = np.repeat(keys, counts)
    h = _mix32(_mix32(v ^ (key & _M32)) ^ (key >> np.uint64(32)))
    return ((h >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) \
        * np.float32(1.0 / (1 << 23))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)); p itself where p <= q everywhere (then p == q)."""
    r = (p - q).clamp_min(0)
    s = r.sum()
    return r / s if s > 0 else p


def _draw(dist: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from `dist` with uniform `u`."""
    c = torch.cumsum(dist.double(), 0)
    i = int(torch.searchsorted(c, c.new_tensor([u * float(c[-1])])).item())
    # (The first index whose cumulative mass reaches u: its own mass is > 0.)
    return min(i, len(dist) - 1)


def rejection_sample_chain(p: torch.Tensor, q: torch.Tensor, draft: Sequence[int],
                           uniforms: torch.Tensor) -> tuple[int, int]:
    """Speculative sampling of a draft chain (Leviathan et al. 2023, Algorithm 1).

    Args:
        p: float [k+1, V] target probabilities at each draft position and
            after the last draft token.
        q: float [k, V] draft probabilities each draft token was drawn from.
        draft: the k draft tokens.
        uniforms: at least 2k+1 uniforms in (0, 1) (`seeded_uniforms`).
    Returns:
        (accepted count n, the token emitted after them): the output
        `draft[:n] + [token]` is distributed exactly as tokens drawn from p.
    """
    k = len(draft)
    for i, x in enumerate(draft):
        px, qx = float(p[i, x]), float(q[i, x])
        if qx > 0 and float(uniforms[2 * i]) * qx < px:  # u < p/q, i.e. min(1, p/q)
            continue
        return i, _draw(residual(p[i], q[i]), float(uniforms[2 * i + 1]))
    return k, _draw(p[k], float(uniforms[2 * k]))


def recursive_rejection_sample(p: torch.Tensor, candidates: Sequence[int],
                               qs: Sequence[torch.Tensor], uniforms: torch.Tensor
                               ) -> tuple[int, int]:
    """One tree node of SpecInfer's multi-candidate verification (Miao et al. 2024).

    `candidates[i]` was drawn from `qs[i]` (its own draft distribution;
    a one-hot q for a proposed token). Candidate i is accepted with
    probability min(1, p'(c_i) / q_i(c_i)) under the current residual p'
    (initially p); on rejection p' <- norm(max(p' - q_i, 0)). Returns (index
    of the accepted candidate, its token), or (-1, a token drawn from the
    final residual). The returned token is distributed exactly as p.
    `uniforms`: at least len(candidates) + 1.
    """
    cur = p
    for i, (c, q) in enumerate(zip(candidates, qs)):
        pc, qc = float(cur[c]), float(q[c])
        if qc > 0 and float(uniforms[i]) * qc < pc:
            return i, int(c)
        cur = residual(cur, q)
    return -1, _draw(cur, float(uniforms[len(candidates)]))


def prune_by_grammar(tree: DraftTree, matcher) -> tuple[DraftTree, list]:
    """Drop the draft nodes the grammar forbids (and their subtrees).

    Returns the pruned tree and, per kept node, a matcher forked at the
    grammar state after that node's path (for its mask); the root's state
    is `matcher` itself, which is not advanced."""
    keep: list[int] = []
    states: dict[int, object] = {-1: matcher}
    for i, tok in enumerate(tree.tokens):
        parent = states.get(tree.parents[i])
        if parent is None or parent.is_stopped() or not parent.validate_tokens([tok]):
            continue
        m = parent.fork()
        m.consume(tok)
        states[i] = m
        keep.append(i)
    pruned = tree.keep(keep)
    return pruned, [states[i] for i in keep]

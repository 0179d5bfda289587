"""Shared by the tree-attention kernel tests: random page tables and the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import torch


def random_tree(rng: np.random.Generator, num_pages: int, page: int, leaves: int,
                shared_pages: int, max_own_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Page tables of `leaves` rows: `shared_pages` common pages, then 1..max_own_pages
    of each leaf's own, all drawn without replacement from a shuffled pool (page
    `num_pages - 1` is left out: graph runners pad with it)."""
    own = rng.integers(1, max_own_pages + 1, leaves)
    pool = rng.permutation(num_pages - 1)
    assert shared_pages + own.sum() <= len(pool), "pool too small for the case"
    shared, rest = pool[:shared_pages], pool[shared_pages:]
    rows, at = [], 0
    for n in own:
        rows.append(np.concatenate([shared, rest[at:at + n]]))
        at += n
    indptr = np.zeros(leaves + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    last = rng.integers(1, page + 1, leaves).astype(np.int32)
    return indptr, np.concatenate(rows).astype(np.int32), last


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              indptr: np.ndarray, indices: np.ndarray, last: np.ndarray,
              sm_scale: float | None = None) -> torch.Tensor:
    """Each row's attention over its own page list, in float64 (GQA: query
    head i reads KV head i // group)."""
    b = len(indptr) - 1
    _, page, hkv, d = k_cache.shape
    group = q.shape[1] // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, q.shape[1], d, dtype=torch.float64)
    for row in range(b):
        pages = torch.from_numpy(indices[indptr[row]:indptr[row + 1]].astype(np.int64))
        n = (len(pages) - 1) * page + int(last[row])
        k = k_cache[pages.to(k_cache.device)].reshape(-1, hkv, d)[:n].double().cpu()
        v = v_cache[pages.to(v_cache.device)].reshape(-1, hkv, d)[:n].double().cpu()
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("hd,thd->ht", q[row].double().cpu(), k) * scale
        out[row] = torch.einsum("ht,thd->hd", s.softmax(-1), v)
    return out

"""Random packed N-bit pages and page tables shared by the kv-quant kernel tests."""

from __future__ import annotations

import torch

from dendrite.model.kv_quant import KVQuantFormat


def random_pages(fmt: KVQuantFormat, lens: list[int], hq: int, hkv: int, page: int,
                 seed: int, device: str = "cpu", spare: int = 3):
    """(q, k_pages, v_pages, kv_indptr, kv_indices, kv_lens): sequences of `lens`
    tokens on shuffled pages of a pool with `spare` unused pages; q float32 [B, hq, D]."""
    g = torch.Generator().manual_seed(seed)
    counts = [(n + page - 1) // page for n in lens]
    num_pages = sum(counts) + spare
    d = fmt.head_dim
    k = fmt.quantize(torch.randn(num_pages, page, hkv, d, generator=g) * 2)
    v = fmt.quantize(torch.randn(num_pages, page, hkv, d, generator=g))
    perm = torch.randperm(num_pages, generator=g).to(torch.int32)
    indptr = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    indices = perm[: sum(counts)]
    q = torch.randn(len(lens), hq, d, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k, v, indptr, indices, lens_t))

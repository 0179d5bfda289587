"""Decode-shaped step plans: every new token of a step runs as a row of its own.

A layer writes the K/V of all of a step's new tokens before any row attends,
so a token whose row lists its sequence's pages up to and including itself
sees the tokens appended before it in the same step, exactly as in a causal
prefill row. Verifying draft tokens (and running a draft model's few new
tokens) this way makes the step decode-shaped: one token per row, every row
sampled, which `ModelRunner.execute` may replay as a CUDA graph (with the
shared-prefix cascade) instead of running eagerly.
"""

from __future__ import annotations

import numpy as np

from dendrite.kv import KVTree
from dendrite.model.runner import StepPlan

__all__ = ["decode_shaped_plan"]


def decode_shaped_plan(tree: KVTree, nodes: np.ndarray, counts: np.ndarray,
                       tokens: np.ndarray, page_size: int) -> StepPlan:
    """Append `counts[b]` of `tokens` to each leaf `nodes[b]` and plan one row per token.

    The rows come in token order; row t's logits predict the token after
    token t. Raises `OutOfPages` (nothing appended) when the pool is short."""
    nodes = np.asarray(nodes, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int32)
    tokens = np.asarray(tokens, dtype=np.int32)
    starts = np.asarray([tree.num_tokens(n) for n in nodes], dtype=np.int64)
    appended = tree.append_batch(nodes, counts, tokens)
    indptr, indices, _ = tree.export_csr(nodes)
    kv_lens = np.concatenate([s + 1 + np.arange(c) for s, c in zip(starts, counts)]) \
        if len(nodes) else np.zeros(0, dtype=np.int64)
    npages = -(-kv_lens // page_size)
    group = np.repeat(np.arange(len(nodes)), counts)
    # Row t's pages: the first npages[t] of its sequence's page list.
    kv_indptr = np.zeros(len(kv_lens) + 1, dtype=np.int32)
    np.cumsum(npages, out=kv_indptr[1:])
    offs = np.arange(int(kv_indptr[-1])) - np.repeat(kv_indptr[:-1], npages)
    kv_indices = indices[np.repeat(indptr[:-1][group], npages) + offs].astype(np.int32)
    last_len = (kv_lens - (npages - 1) * page_size).astype(np.int32)
    return StepPlan(input_ids=tokens, positions=kv_lens - 1,
                    slot_mapping=appended.slot_mapping,
                    qo_indptr=np.arange(len(tokens) + 1, dtype=np.int32),
                    kv_indptr=kv_indptr, kv_indices=kv_indices, kv_last_page_len=last_len,
                    copies=appended.copies, sample_rows=np.arange(len(tokens), dtype=np.int64))

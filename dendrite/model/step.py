"""`StepPlan`: one engine step as the model runner takes it.

The engine decides what a step does (which leaves run, their new tokens, the
pages they read and write, the copy-on-write rows the KV tree emitted, which
leaves sample); the runner decides how it runs (`ModelRunner.execute`: eager
forward or a CUDA-graph replay). This dataclass is the whole interface
between the two, in the native core's host arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["StepPlan"]


@dataclass(frozen=True)
class StepPlan:
    """The B rows (sequences) and T new tokens of one step; host numpy arrays.

    Row `b`'s new tokens are `input_ids[qo_indptr[b]:qo_indptr[b + 1]]`, the
    last ones of its KV; its pages are `kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`
    (all full but the last, which holds `kv_last_page_len[b]` tokens after
    this step), the paged layout of dendrite/attention/base.py.
    """

    #: int [T] token ids; or, for a step launched before the previous step's
    #: tokens were read, a device tensor of those sampled ids (one per row).
    input_ids: np.ndarray | torch.Tensor
    positions: np.ndarray  # int64 [T], absolute position of each new token
    slot_mapping: np.ndarray  # int64 [T], page * page_size + offset where its K/V goes
    qo_indptr: np.ndarray  # int32 [B+1]
    kv_indptr: np.ndarray  # int32 [B+1]
    kv_indices: np.ndarray  # int32 [nnz pages]
    kv_last_page_len: np.ndarray  # int32 [B], in [1, page_size]
    #: int32 [m, 3] copy-on-write rows (src_page, dst_page, num_tokens) from the
    #: KV tree, executed before any of the step's K/V is written.
    copies: np.ndarray
    #: int [N] rows whose next-token logits are wanted (ascending); the
    #: logits come back in this order.
    sample_rows: np.ndarray
    #: int64 [M] indices into the T new tokens whose logits are wanted too
    #: (the engine scores tokens appended without sampling, e.g. grammar-
    #: forced ones, from the logits at the position before each); they come
    #: back after the sample rows', in this order. Empty: none.
    score_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_rows(self) -> int:
        """B, the sequences of the step."""
        return len(self.qo_indptr) - 1

    @property
    def num_tokens(self) -> int:
        """T, the new tokens of the step."""
        return int(self.qo_indptr[-1])

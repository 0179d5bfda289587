"""The attention seam: per-step metadata and the backend protocol.

Every step the engine turns the native core's numpy CSR arrays into one
`AttentionMetadata` on the device (`build_attention_metadata`). The model
writes the step's new K/V at `slot_mapping`, then calls
`backend.forward(layer, q, k_cache, v_cache)` for every layer after a single
`backend.plan(meta)`.

Paged layout (FlashInfer "NHD"): a layer's cache is a pair of tensors
`[num_pages, page_size, Hkv, D]`; sequence `b` owns pages
`kv_indices[kv_indptr[b]:kv_indptr[b+1]]`, all full except the last, which
holds `kv_last_page_len[b]` tokens. The step's new tokens of a sequence are the
last `qo_len` tokens of its KV, so causal masking aligns queries to the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dendrite.transfer import to_device

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "HostMetadata",
    "build_attention_metadata",
]


@dataclass(frozen=True)
class HostMetadata:
    """CPU int32 mirrors of the index arrays, so planning never syncs the device.

    FlashInfer's `plan()` and the reference backend's per-sequence loop read
    these sizes on the host; reading them back from the GPU would stall the
    stream once per step.
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    kv_lens: torch.Tensor


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's batch layout, tensors on the model's device (see design.md).

    `T` new tokens across `B` sequences; the tokens of sequence `b` are
    `T[qo_indptr[b]:qo_indptr[b+1]]` and must be contiguous and in order.
    """

    positions: torch.Tensor  # int64 [T], absolute position of each new token
    slot_mapping: torch.Tensor  # int64 [T], page * page_size + offset
    qo_indptr: torch.Tensor  # int32 [B+1]
    kv_indptr: torch.Tensor  # int32 [B+1]
    kv_indices: torch.Tensor  # int32 [nnz pages]
    kv_last_page_len: torch.Tensor  # int32 [B], in [1, page_size]
    kv_lens: torch.Tensor  # int32 [B], tokens of b after this step
    is_decode: bool  # every sequence has exactly one new token
    page_size: int
    host: HostMetadata | None = None

    @property
    def num_tokens(self) -> int:
        """Query tokens in the step (all sequences together)."""
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        """Sequences (query rows) in the step."""
        return int(self.qo_indptr.shape[0]) - 1

    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last new token: where next-token logits come from."""
        indptr = self.host.qo_indptr if self.host is not None else self.qo_indptr
        return (indptr[1:].to(torch.int64) - 1).to(self.positions.device, non_blocking=True)


@runtime_checkable
class AttentionBackend(Protocol):
    """Paged attention over one step, planned once and run per layer."""

    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare the step described by `meta`; shared by all layers."""
        ...

    def forward(
        self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """`q` [T, Hq, D] against caches [num_pages, page_size, Hkv, D]
        (the step's K/V already written); returns [T, Hq, D]."""
        ...


def _as_np(name: str, a: np.ndarray | torch.Tensor | list[int], dtype: type) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    # Always a private copy: the host mirrors must not alias the caller's buffers.
    return np.array(arr, dtype=dtype, copy=True)


def _check(
    positions: np.ndarray,
    slot_mapping: np.ndarray,
    qo_indptr: np.ndarray,
    kv_indptr: np.ndarray,
    kv_indices: np.ndarray,
    kv_last_page_len: np.ndarray,
    kv_lens: np.ndarray,
    page_size: int,
) -> None:
    """Cheap host-side consistency checks; an engine bug fails here, not in a kernel."""
    b = len(qo_indptr) - 1
    if b < 0 or len(kv_indptr) != b + 1 or len(kv_last_page_len) != b or len(kv_lens) != b:
        raise ValueError(
            f"inconsistent batch size: qo_indptr {len(qo_indptr)}, kv_indptr {len(kv_indptr)}, "
            f"kv_last_page_len {len(kv_last_page_len)}, kv_lens {len(kv_lens)}"
        )
    t = len(positions)
    if len(slot_mapping) != t or qo_indptr[0] != 0 or qo_indptr[-1] != t:
        raise ValueError(
            f"{t} positions, {len(slot_mapping)} slots, qo_indptr ends "
            f"[{qo_indptr[0]}, {qo_indptr[-1]}]"
        )
    if kv_indptr[0] != 0 or kv_indptr[-1] != len(kv_indices):
        raise ValueError(
            f"kv_indptr spans [{kv_indptr[0]}, {kv_indptr[-1]}] "
            f"but there are {len(kv_indices)} kv_indices"
        )
    qo_lens, n_pages = np.diff(qo_indptr), np.diff(kv_indptr)
    if (qo_lens < 0).any() or (n_pages < 1).any():
        raise ValueError("every sequence needs >= 0 new tokens and >= 1 page")
    if ((kv_last_page_len < 1) | (kv_last_page_len > page_size)).any():
        raise ValueError(f"kv_last_page_len outside [1, {page_size}]: {kv_last_page_len}")
    expect = (n_pages - 1) * page_size + kv_last_page_len
    if not np.array_equal(expect, kv_lens):
        raise ValueError(f"kv_lens {kv_lens} disagree with the page tables {expect}")
    if (qo_lens > kv_lens).any():
        raise ValueError("a sequence has more new tokens than KV tokens")


def build_attention_metadata(
    positions: np.ndarray | torch.Tensor | list[int],
    slot_mapping: np.ndarray | torch.Tensor | list[int],
    qo_indptr: np.ndarray | torch.Tensor | list[int],
    kv_indptr: np.ndarray | torch.Tensor | list[int],
    kv_indices: np.ndarray | torch.Tensor | list[int],
    kv_last_page_len: np.ndarray | torch.Tensor | list[int],
    *,
    page_size: int,
    device: torch.device | str = "cpu",
    kv_lens: np.ndarray | torch.Tensor | list[int] | None = None,
    validate: bool = True,
) -> AttentionMetadata:
    """Build `AttentionMetadata` on `device` from the native core's CSR arrays.

    `kv_lens` defaults to what the page tables imply
    (`(pages - 1) * page_size + last_page_len`). The index arrays are packed
    into two host buffers (int64, int32), each moved with one asynchronous
    copy through pinned memory; host mirrors stay in `meta.host`.
    """
    pos = _as_np("positions", positions, np.int64)
    slots = _as_np("slot_mapping", slot_mapping, np.int64)
    qo = _as_np("qo_indptr", qo_indptr, np.int32)
    kvp = _as_np("kv_indptr", kv_indptr, np.int32)
    kvi = _as_np("kv_indices", kv_indices, np.int32)
    last = _as_np("kv_last_page_len", kv_last_page_len, np.int32)
    if kv_lens is None:
        lens = ((np.diff(kvp) - 1) * page_size + last).astype(np.int32)
    else:
        lens = _as_np("kv_lens", kv_lens, np.int32)
    if validate:
        _check(pos, slots, qo, kvp, kvi, last, lens, page_size)
    is_decode = bool(len(qo) > 1 and (np.diff(qo) == 1).all())

    dev = torch.device(device)
    # Two packed buffers (int64 and int32 fields) -> two asynchronous transfers.
    wide, narrow = [pos, slots], [qo, kvp, kvi, last, lens]
    f = list(torch.split(to_device(np.concatenate(wide), dev), [len(p) for p in wide]))
    f += torch.split(to_device(np.concatenate(narrow), dev), [len(p) for p in narrow])

    host = HostMetadata(
        qo_indptr=torch.from_numpy(qo),
        kv_indptr=torch.from_numpy(kvp),
        kv_last_page_len=torch.from_numpy(last),
        kv_lens=torch.from_numpy(lens),
    )
    return AttentionMetadata(
        positions=f[0],
        slot_mapping=f[1],
        qo_indptr=f[2],
        kv_indptr=f[3],
        kv_indices=f[4],
        kv_last_page_len=f[5],
        kv_lens=f[6],
        is_decode=is_decode,
        page_size=page_size,
        host=host,
    )

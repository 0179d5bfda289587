"""`ModelRunner`: model + KV pool + attention backend, one call per engine step.

The engine owns the page tables (native KV tree) and passes, per step, the
token ids, an `AttentionMetadata` and the copy-on-write rows the tree emitted;
the runner executes the copies, plans the backend once, runs the model and
returns float32 logits of the rows that need sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dendrite.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    build_attention_metadata,
)
from dendrite.attention.reference import ReferenceBackend
from dendrite.model.config import ModelConfig
from dendrite.model.kv_cache import KVCache
from dendrite.model.loader import LoadedModel, load
from dendrite.model.runner_args import check_runner_args

__all__ = ["ModelRunner", "default_num_pages", "make_backend"]

log = logging.getLogger(__name__)

#: CPU default KV budget; the engine can always pass `num_pages`.
CPU_KV_BYTES = 1 << 30
CPU_MAX_TOKENS = 1 << 18
#: Share of the free accelerator memory (after weights) given to the KV pool.
GPU_KV_FRACTION = 0.85


def make_backend(
    attention: str | AttentionBackend,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    page_size: int,
) -> AttentionBackend:
    """'auto' (FlashInfer on CUDA fp16/bf16 when installed, else reference),
    'reference', 'flashinfer', or a ready backend instance."""
    if not isinstance(attention, str):
        return attention
    if attention == "auto":
        from dendrite.attention.flashinfer_backend import flashinfer_available

        attention = "flashinfer" if flashinfer_available(device, dtype) else "reference"
    if attention == "reference":
        return ReferenceBackend(
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            page_size,
            sliding_windows=config.sliding_windows,
        )
    if attention == "flashinfer":
        from dendrite.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            page_size=page_size,
            dtype=dtype,
            device=device,
            sliding_windows=config.sliding_windows,
        )
    raise ValueError(f"unknown attention backend {attention!r} (auto, reference, flashinfer)")


def default_num_pages(
    config: ModelConfig, page_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Pages that fit the default KV budget of `device`."""
    per_page = KVCache.bytes_per_page(
        config.num_layers, page_size, config.num_kv_heads, config.head_dim, dtype
    )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * GPU_KV_FRACTION) // per_page)
    return max(1, min(CPU_KV_BYTES // per_page, CPU_MAX_TOKENS // page_size))


class ModelRunner:
    """Runs one batched forward per engine step over the paged KV pool."""

    def __init__(
        self,
        model: str | Path | LoadedModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        attention: str | AttentionBackend = "auto",
    ) -> None:
        check_runner_args(model, device, dtype, num_pages, page_size, attention)  # before loading
        self.loaded = model if isinstance(model, LoadedModel) else load(model, device, dtype)
        self.model, self.config = self.loaded.model, self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.page_size = page_size
        if num_pages is None:
            num_pages = default_num_pages(self.config, page_size, self.dtype, self.device)
        self.kv_cache = KVCache(
            self.config.num_layers,
            num_pages,
            page_size,
            self.config.num_kv_heads,
            self.config.head_dim,
            self.dtype,
            self.device,
        )
        self.backend = make_backend(attention, self.config, self.device, self.dtype, page_size)
        self.model.backend = self.backend
        windows = [w for w in self.config.sliding_windows if w is not None]
        # Backends without window support are exact until a sequence outgrows it.
        self._unsupported_window = (
            min(windows)
            if windows and getattr(self.backend, "sliding_windows", None) is None
            else None
        )

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def build_metadata(
        self,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        qo_indptr: np.ndarray,
        kv_indptr: np.ndarray,
        kv_indices: np.ndarray,
        kv_last_page_len: np.ndarray,
        kv_lens: np.ndarray | None = None,
        validate: bool = True,
    ) -> AttentionMetadata:
        """`build_attention_metadata` on this runner's device and page size."""
        return build_attention_metadata(
            positions,
            slot_mapping,
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            page_size=self.page_size,
            device=self.device,
            kv_lens=kv_lens,
            validate=validate,
        )

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor | np.ndarray | Sequence[int],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        copies: np.ndarray | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step: copy-on-write, then forward, then logits.

        Args:
            input_ids: int [T] new tokens, grouped by sequence as in `meta`.
            meta: the step's metadata (see `build_metadata`).
            logits_indices: rows of T to compute logits for; default the last
                new token of every sequence (one row per sequence, in order).
            copies: int32 [m, 3] (src_page, dst_page, num_tokens) rows from the
                KV tree, executed before any new K/V is written.
        Returns:
            float32 logits [N, vocab_size] on the device.
        """
        if (
            self._unsupported_window is not None
            and meta.host is not None
            and meta.num_seqs
            and int(meta.host.kv_lens.max()) > self._unsupported_window
        ):
            raise NotImplementedError(
                f"sequence longer than the sliding window ({self._unsupported_window}) "
                f"and backend {type(self.backend).__name__} has no sliding-window support"
            )
        if copies is not None and len(copies):
            self.kv_cache.copy_pages(copies)
        ids = (
            torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
            if not isinstance(input_ids, torch.Tensor)
            else input_ids.to(torch.int64)
        )
        ids = ids.to(self.device, non_blocking=True)
        self.backend.plan(meta)
        hidden = self.model(ids, meta, self.kv_cache, self.backend)
        if logits_indices is None:
            rows = meta.last_token_indices()
        else:
            rows = (
                torch.as_tensor(np.asarray(logits_indices, dtype=np.int64))
                if not isinstance(logits_indices, torch.Tensor)
                else logits_indices
            )
            rows = rows.to(self.device, torch.int64)
        return self.model.compute_logits(hidden[rows])

"""`ModelRunner`: model + KV pool + attention backend (+ CUDA graphs), one call per step.

The engine owns the page tables (native KV tree) and hands the runner, per
step, a `StepPlan` (dendrite/model/step.py): the token ids, positions, page
tables, the copy-on-write rows the tree emitted and which rows sample.
`execute(plan)` runs the copies, then either replays a captured CUDA graph
(a decode step whose every row samples, on CUDA with FlashInfer, when the
runner was built with `cuda_graphs=True`) or plans the backend once and runs
the model eagerly, and returns the float32 logits of the sampling rows.
Whether graphs or eager run is the runner's decision alone.

The runner also holds the `KernelConfig` (dendrite/kernels/config.py) that
every step passes down to the model and the graphs, and that the engine's
sampler reads. `run(input_ids, meta, ...)` is the eager step on ready-made
`AttentionMetadata`, for tests and benchmarks that drive the model directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dendrite.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    build_attention_metadata,
)
from dendrite.attention.reference import ReferenceBackend
from dendrite.kernels.config import KernelConfig
from dendrite.model.config import ModelConfig
from dendrite.model.kv_cache import KVCache, KVScales, kv_format
from dendrite.model.kv_quant_cache import QuantKVCache, make_kv_cache, page_bytes
from dendrite.model.loader import LoadedModel, load
from dendrite.model.runner_args import check_runner_args
from dendrite.model.step import StepPlan
from dendrite.quant.scheme import check_lm_head, check_quantization

if TYPE_CHECKING:
    from dendrite.model.cuda_graph import CudaGraphDecodeRunner
    from dendrite.model.kv_calibration import KVCalibration

__all__ = ["CASCADE_MODES", "ModelRunner", "StepPlan", "default_num_pages", "make_backend"]

log = logging.getLogger(__name__)

#: CPU default KV budget; the engine can always pass `num_pages`.
CPU_KV_BYTES = 1 << 30
CPU_MAX_TOKENS = 1 << 18
#: Share of the free accelerator memory (after weights) given to the KV pool.
GPU_KV_FRACTION = 0.85
#: Largest decode batch replayed from a CUDA graph (bigger steps run eagerly).
MAX_GRAPH_BATCH = 64
#: When a replayed decode step attends as cascade (see dendrite/model/cuda_graph.py).
CASCADE_MODES = ("auto", "always", "never")


def make_backend(
    attention: str | AttentionBackend,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    page_size: int,
    kv_dtype: torch.dtype | None = None,
    kv_scales: KVScales | None = None,
    kv_pool: object = None,
) -> AttentionBackend:
    """'auto' (FlashInfer on CUDA fp16/bf16 when installed, else reference),
    'reference', 'flashinfer', or a ready backend instance. `kv_dtype` /
    `kv_scales`: the pool's element dtype and scales when it is FP8.
    `kv_pool`: the pool, when it is N-bit pages (`QuantKVCache`) they need
    their own backend (dendrite/attention/quant_kv.py)."""
    if isinstance(kv_pool, QuantKVCache):
        # (lazy: quant_kv imports dendrite.model's modules, whose package imports this one)
        from dendrite.attention.quant_kv import make_quant_backend

        return make_quant_backend(attention, config.num_heads, config.num_kv_heads,
                                  config.head_dim, page_size, kv_pool, config.sliding_windows)
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
            kv_scales=kv_scales,
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
            kv_dtype=kv_dtype,
            kv_scales=kv_scales,
        )
    raise ValueError(f"unknown attention backend {attention!r} (auto, reference, flashinfer)")


def default_num_pages(
    config: ModelConfig, page_size: int, dtype: torch.dtype, device: torch.device,
    per_page: int | None = None,
) -> int:
    """Pages that fit the default KV budget of `device`; `dtype` is the pool's
    element dtype (an FP8 pool fits twice the pages of a 16-bit one), or
    `per_page` the bytes of a page (N-bit pages)."""
    if per_page is None:
        per_page = KVCache.bytes_per_page(
            config.num_layers, page_size, config.num_kv_heads, config.head_dim, dtype
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * GPU_KV_FRACTION) // per_page)
    return max(1, min(CPU_KV_BYTES // per_page, CPU_MAX_TOKENS // page_size))


class ModelRunner:
    """Runs one batched forward per engine step over the paged KV pool.

    Args beyond the model, device, dtype and pool shape:
        attention: "auto", "reference", "flashinfer" or a ready backend.
        kernels: the Triton kernel families steps may use; default
            `KernelConfig.from_env()`. Held as `self.kernels` and passed to
            every eager step; CUDA graphs keep the config they were captured
            with.
        cuda_graphs: capture decode steps as CUDA graphs now and replay them
            (CUDA + FlashInfer only; elsewhere ignored). Their padding rows
            write into the pool's last page, so the page allocator gets
            `allocatable_pages`, one fewer.
        cascade: how replayed decode steps whose rows share a page prefix
            attend: "auto" (when the graph rule says it is faster), "always",
            "never" (flat paged decode).
        kv_dtype: the KV pool's element format: None / "auto" (the model
            dtype) or "fp8_e4m3" (float8_e4m3fn with per-layer scales,
            calibrated at load by dendrite/model/kv_calibration.py before any
            CUDA graph is captured).
        quantization: how the attention/MLP projections are stored: None (as
            the checkpoint is), "none" (dense, model dtype), "fp8" (e4m3,
            128 x 128 block scales) or "mxfp8" (e4m3, e8m0 scales per 32);
            see dendrite/quant. Unused with a LoadedModel.
        quantize_lm_head: the output projection too, in `quantization`'s
            format ("fp8" or "mxfp8"). Unused with a LoadedModel.
    """

    def __init__(
        self,
        model: str | Path | LoadedModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        attention: str | AttentionBackend = "auto",
        *,
        kernels: KernelConfig | None = None,
        cuda_graphs: bool = False,
        cascade: str = "auto",
        kv_dtype: str | None = None,
        quantization: str | None = None,
        quantize_lm_head: bool = False,
    ) -> None:
        kv_fmt = kv_format(kv_dtype)  # (a ValueError naming kv_dtype, before loading)
        check_runner_args(model, device, dtype, num_pages, page_size, attention,
                          kv_dtype=kv_fmt)
        kernels = _step_args(kernels, cuda_graphs, cascade)  # (the environment too)
        check_quantization(quantization)
        check_lm_head(quantize_lm_head, quantization)
        self.loaded = model if isinstance(model, LoadedModel) else load(
            model, device, dtype, quantization=quantization, quantize_lm_head=quantize_lm_head)
        self.model, self.config = self.loaded.model, self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.page_size = page_size
        kv_storage = kv_fmt.storage_dtype(self.dtype)
        if num_pages is None:
            num_pages = default_num_pages(self.config, page_size, kv_storage, self.device,
                                          per_page=page_bytes(kv_fmt, self.config.num_layers,
                                                              page_size, self.config.num_kv_heads,
                                                              self.config.head_dim, self.dtype))
        # (a QuantKVCache for N-bit pages, kv_dtype "int4" / "int3")
        self.kv_cache = make_kv_cache(kv_fmt, self.config.num_layers, num_pages, page_size,
                                      self.config.num_kv_heads, self.config.head_dim,
                                      self.dtype, self.device)
        self.kv_scale_calibration: KVCalibration | None = None
        if kv_fmt.quantized:
            self._calibrate_kv_scales()
        self.backend = make_backend(attention, self.config, self.device, self.dtype, page_size,
                                    kv_dtype=kv_storage if kv_fmt.quantized else None,
                                    kv_scales=self.kv_cache.scales if kv_fmt.quantized else None,
                                    kv_pool=self.kv_cache)
        if kv_fmt.quantized and not isinstance(attention, str):
            _adopt_fp8_backend(self.backend, self.kv_cache)
        self.model.backend = self.backend
        windows = [w for w in self.config.sliding_windows if w is not None]
        # Backends without window support are exact until a sequence outgrows it.
        self._unsupported_window = (
            min(windows)
            if windows and getattr(self.backend, "sliding_windows", None) is None
            else None
        )
        self.kernels = kernels
        self.graphs: CudaGraphDecodeRunner | None = (
            self._capture_graphs(cascade) if cuda_graphs else None)

    def _calibrate_kv_scales(self) -> None:
        """Set the FP8 pool's per-layer scales and K means from one forward over
        the calibration text (dendrite/model/kv_calibration.py)."""
        from dendrite.model.kv_calibration import calibrate_kv_scales

        cal = calibrate_kv_scales(
            self.model, self.tokenizer, device=self.device, dtype=self.dtype,
            page_size=self.page_size, max_value=self.kv_cache.format.max_value)
        self.kv_cache.scales.set(cal.k_scales, cal.v_scales)
        self.kv_cache.set_k_mean(cal.k_mean)
        self.kv_scale_calibration = cal

    @property
    def kv_dtype(self) -> str:
        """The KV pool's format name: "auto", "fp8_e4m3", "int4" or "int3"."""
        return self.kv_cache.format.name

    @property
    def kv_bytes_per_token(self) -> int:
        """Device bytes of one token's K and V over every layer."""
        return self.kv_cache.bytes_per_token

    def _capture_graphs(self, cascade: str) -> CudaGraphDecodeRunner | None:
        """Decode graphs for every bucket up to MAX_GRAPH_BATCH rows, or None
        where they cannot run (not CUDA, or a backend other than FlashInfer)."""
        if self.device.type != "cuda":
            return None
        from dendrite.attention.flashinfer_backend import FlashInferBackend

        if not isinstance(self.backend, FlashInferBackend):
            return None
        from dendrite.model.cuda_graph import CudaGraphDecodeRunner

        graphs = CudaGraphDecodeRunner(self.model, self.kv_cache, self.backend,
                                       max_batch_size=MAX_GRAPH_BATCH, cascade=cascade,
                                       kernels=self.kernels)
        graphs.capture()
        return graphs

    @property
    def num_pages(self) -> int:
        """Pages in the KV pool."""
        return self.kv_cache.num_pages

    @property
    def allocatable_pages(self) -> int:
        """Pages a page allocator may hand out: all but the CUDA graphs' pad page."""
        return self.num_pages - 1 if self.graphs is not None else self.num_pages

    @property
    def kv_bytes_per_page(self) -> int:
        """Device bytes of one KV page (every layer, K and V)."""
        return self.kv_cache.nbytes // self.num_pages

    @property
    def vocab_size(self) -> int:
        """Rows of the logits: the model's vocabulary size."""
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
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """One engine step: copy-on-write, then the forward, then the logits of
        `plan.sample_rows` (float32 [N, vocab_size] on the device, in that order),
        followed by those of `plan.score_rows` (M more rows) when it has any.

        Valid until the next `execute`: a replayed CUDA graph returns a view
        of its static output buffer. The plan is trusted (the engine builds
        it from the KV tree); `run` with `build_metadata` validates.
        """
        meta = self.build_metadata(plan.positions, plan.slot_mapping, plan.qo_indptr,
                                   plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
                                   validate=False)
        # A graph computes one logits row per sequence: extra score rows run eagerly.
        if (self.graphs is not None and len(plan.sample_rows) == plan.num_rows
                and not len(plan.score_rows) and self.graphs.can_run(meta)):
            if len(plan.copies):
                self.kv_cache.copy_pages(plan.copies)
            return self.graphs.run(plan.input_ids, meta, host_indices=plan.kv_indices)
        rows = (plan.qo_indptr[1:] - 1)[plan.sample_rows]
        if len(plan.score_rows):
            rows = np.concatenate([rows.astype(np.int64), plan.score_rows.astype(np.int64)])
        return self.run(plan.input_ids, meta, rows, copies=plan.copies)

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor | np.ndarray | Sequence[int],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        copies: np.ndarray | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One eager step: copy-on-write, then forward, then logits.

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
        hidden = self.model(ids, meta, self.kv_cache, self.backend, kernels=self.kernels)
        if logits_indices is None:
            rows = meta.last_token_indices()
        else:
            rows = (
                torch.as_tensor(np.asarray(logits_indices, dtype=np.int64))
                if not isinstance(logits_indices, torch.Tensor)
                else logits_indices
            )
            rows = rows.to(self.device, torch.int64)
        return self.model.compute_logits(hidden[rows], self.kernels)


def _adopt_fp8_backend(backend: object, kv_cache: KVCache) -> None:
    """A ready backend on an FP8 pool must read FP8 pages: it gets the pool's scales."""
    if not hasattr(backend, "kv_scales"):
        raise ValueError(f"kv_dtype='fp8_e4m3' needs an attention backend that reads FP8 pages "
                         f"(reference or flashinfer); {type(backend).__name__} has no kv_scales")
    kv_dt = getattr(backend, "kv_dtype", kv_cache.storage_dtype)
    if kv_dt != kv_cache.storage_dtype:
        raise ValueError(f"kv_dtype='fp8_e4m3': the attention backend was built for "
                         f"{kv_dt} pages, the pool stores {kv_cache.storage_dtype}")
    backend.kv_scales = kv_cache.scales  # type: ignore[attr-defined]


def _step_args(kernels: object, cuda_graphs: object, cascade: object) -> KernelConfig:
    """The runner's kernel config (default from the environment), after checking
    the step arguments: TypeError/ValueError naming the first bad one."""
    if kernels is not None and not isinstance(kernels, KernelConfig):
        raise TypeError(f"kernels must be a KernelConfig or None, got {type(kernels).__name__}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
    if cascade not in CASCADE_MODES:
        raise ValueError(f"cascade must be 'auto', 'always' or 'never', got {cascade!r}")
    return kernels if kernels is not None else KernelConfig.from_env()

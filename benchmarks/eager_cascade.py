"""The eager cascade attention backend, kept for benchmarks/bench_tree_gpu.py.

The engine's cascade runs inside its CUDA graphs (dendrite/model/cuda_graph.py:
FlashInfer's two levels or Dendrite's TreeAttention). This is the earlier
eager variant, which bench_tree_gpu.py measures against flat paged decode in
its `decode` section (for an engine built without graphs) and its `cascade`
section (the attention-only grid behind `EAGER_RULE`); it is not part of the
package.

When B leaves of one tree decode together, flat paged decode reads the common
prefix once per leaf. FlashInfer's `MultiLevelCascadeAttentionWrapper` splits
the step in two levels over the same paged cache:

* level 0: the shared prefix pages as ONE entry, attended by all B queries at
  once (a B-row, non-causal "prefill" over the prefix: the prefix is read once);
* level 1: each leaf's remaining pages (its own suffix), one query per leaf;

and merges the two partial softmaxes. `CascadeBackend` implements the
`AttentionBackend` protocol around the flat `FlashInferBackend`: each
`plan(meta)` decides between cascade and flat with its rule and falls back to
the flat backend for everything else (prefill / mixed steps, B = 1, no shared
prefix, sliding windows).

`enable_cascade(engine)` installs it on an engine's runner for a measurement:
it swaps the runner's backend and wraps the runner's `build_metadata` (an
instance attribute) to hand the step's host page list to the backend;
`disable_cascade` undoes both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dendrite.attention.cascade import CascadeRule, shared_prefix_pages, split_levels
from dendrite.transfer import to_device

__all__ = ["CascadeBackend", "EAGER_RULE", "disable_cascade", "enable_cascade", "use_cascade"]

log = logging.getLogger(__name__)

#: When an eager step runs as cascade. Measured (benchmarks/bench_tree_gpu.py,
#: H100, 2026-11-22, Llama-3.2-1B shape: 32 query / 8 KV heads, head_dim 64,
#: bf16, page 16, eager engine steps): over a 4K-token shared prefix, flat
#: decode steps took 19.1 / 19.4 / 21.9 ms at 4 / 16 / 64 leaves and cascade
#: (fa2 levels) 22.7 / 24.4 / 25.3 ms. An eager step is host-bound: flat
#: attention over 64 x 4K tokens is hidden behind the launches, while cascade
#: adds a second plan per step and three launches (two levels + merge) per
#: layer. So cascade must save more GPU time than that overhead, which takes
#: many leaves over a prefix longer than those measured; the thresholds keep
#: every measured point on flat and switch only far beyond them (B = 64 over
#: 16K tokens, ~1M redundant token reads per layer). Steps replayed from CUDA
#: graphs use GRAPH_CASCADE_RULE / GRAPH_TREE_RULE (dendrite/model/cuda_graph.py).
EAGER_RULE = CascadeRule(min_batch=8, min_shared=8192, min_saved_tokens=1 << 19,
                         min_shared_ratio=1.0)


def use_cascade(batch: int, shared_tokens: int, unique_tokens: float) -> bool:
    """Whether an eager decode step of `batch` leaves sharing `shared_tokens`
    (full pages) with `unique_tokens` of their own on average runs as cascade."""
    return EAGER_RULE(batch, shared_tokens, unique_tokens)


# -- the backend ------------------------------------------------------------------------
class CascadeBackend:
    """AttentionBackend: cascade for shared-prefix decode steps, flat otherwise.

    Args:
        flat: the flat `FlashInferBackend` (its workspace, shapes and dtype are
            shared; every non-cascade step is delegated to it).
        mode: "auto" (the rule decides), "always" (cascade whenever a prefix
            is shared), "never" (always flat; for measurements).
        rule: `(batch, shared_tokens, unique_tokens) -> bool`, default `use_cascade`.
        prefill_backend: FlashInfer prefill backend of the two levels. "fa2"
            by default: it splits long KV across CTAs and packs the GQA group
            into the query tile, which the one-entry shared level needs (the
            SM90 "fa3" schedule does neither, so a 16K prefix would run on
            one CTA per query head). "auto" lets FlashInfer pick.
    """

    name = "cascade"

    def __init__(self, flat: Any, mode: str = "auto",
                 rule: Callable[[int, int, float], bool] | None = None,
                 prefill_backend: str = "fa2") -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"mode must be auto, always or never, not {mode!r}")
        self.flat = flat
        self.mode = mode
        self.rule = rule or use_cascade
        self.prefill_backend = prefill_backend
        self.page_size = flat.page_size
        self.sliding_windows = getattr(flat, "sliding_windows", None)
        self._windowed = any(w is not None for w in (self.sliding_windows or []))
        self._wrapper: Any = None
        self._cascade_now = False
        self._disabled: str | None = None  # why cascade was switched off for good
        self._hint: tuple[np.ndarray, np.ndarray] | None = None
        self.stats = {"cascade_steps": 0, "flat_steps": 0, "last_shared_pages": 0,
                      "host_reads": 0}

    # -- host page lists ------------------------------------------------------
    def hint_host_indices(self, kv_indptr: Any, kv_indices: Any) -> None:
        """The next `plan()`'s page tables as host arrays (from the engine's
        export_csr), so planning reads no index back from the device."""
        self._hint = (np.asarray(kv_indptr), np.asarray(kv_indices))

    def _host_tables(self, meta: Any) -> tuple[np.ndarray, np.ndarray]:
        host = getattr(meta, "host", None)
        indptr = (host.kv_indptr if host is not None else meta.kv_indptr.cpu()).numpy()
        hint, self._hint = self._hint, None
        if hint is not None and len(hint[1]) == int(meta.kv_indices.shape[0]) \
                and np.array_equal(hint[0], indptr):
            return indptr, hint[1]
        self.stats["host_reads"] += 1
        return indptr, meta.kv_indices.cpu().numpy()

    # -- planning -------------------------------------------------------------
    def plan(self, meta: Any) -> None:
        self._cascade_now = False
        if (self.mode != "never" and self._disabled is None and not self._windowed
                and meta.is_decode and meta.num_seqs >= 2):
            indptr, indices = self._host_tables(meta)
            shared = shared_prefix_pages(indptr, indices)
            self.stats["last_shared_pages"] = shared
            if shared > 0:
                b = meta.num_seqs
                shared_tokens = shared * self.page_size
                host = getattr(meta, "host", None)
                lens = host.kv_lens if host is not None else meta.kv_lens.cpu()
                unique_tokens = float(lens.double().mean()) - shared_tokens
                wanted = self.mode == "always" or self.rule(b, shared_tokens, unique_tokens)
                if wanted and self._plan_cascade(meta, indptr, indices, shared):
                    self._cascade_now = True
                    self.stats["cascade_steps"] += 1
                    return
        else:
            self._hint = None
        self.stats["flat_steps"] += 1
        self.flat.plan(meta)

    def _make_wrapper(self, backend: str) -> Any:
        fi = self.flat.fi
        w = fi.MultiLevelCascadeAttentionWrapper(2, self.flat.workspace, "NHD")
        if backend != "auto":
            # The wrapper builds its per-level prefill wrappers with backend
            # "auto"; it has no argument for it, so replace them (same class,
            # same workspace) when another backend is asked for.
            if not hasattr(w, "_batch_prefill_wrappers"):
                raise RuntimeError("unknown MultiLevelCascadeAttentionWrapper layout")
            w._batch_prefill_wrappers = [
                fi.BatchPrefillWithPagedKVCacheWrapper(self.flat.workspace, "NHD",
                                                       backend=backend)
                for _ in range(2)]
        return w

    def _plan_cascade(self, meta: Any, indptr: np.ndarray, indices: np.ndarray,
                      shared: int) -> bool:
        b = meta.num_seqs
        dev = self.flat.device
        _, unique_indptr, unique_indices = split_levels(indptr, indices, shared)
        host = getattr(meta, "host", None)
        last = host.kv_last_page_len if host is not None else meta.kv_last_page_len.cpu()
        i32 = torch.int32
        qo = [torch.tensor([0, b], dtype=i32), torch.arange(b + 1, dtype=i32)]
        kv_indptr = [torch.tensor([0, shared], dtype=i32), torch.from_numpy(unique_indptr)]
        kv_idx = [meta.kv_indices[indptr[0]:indptr[0] + shared],  # a device view, no copy
                  to_device(unique_indices, dev)]
        lasts = [torch.tensor([self.page_size], dtype=i32), last.to(i32)]
        f = self.flat
        args = (qo, kv_indptr, kv_idx, lasts, f.num_heads, f.num_kv_heads, f.head_dim,
                self.page_size)
        kwargs = {"causal": False, "sm_scale": f.sm_scale, "q_data_type": f.dtype,
                  "kv_data_type": f.dtype}
        for backend in dict.fromkeys([self.prefill_backend, "fa2"]):
            try:
                if self._wrapper is None:
                    self._wrapper = self._make_wrapper(backend)
                f.fence.before(self._wrapper)  # its pinned schedule buffer (see PlanFence)
                self._wrapper.plan(*args, **kwargs)
                f.fence.after(self._wrapper)
                return True
            except Exception as e:  # noqa: BLE001 - a JIT build can fail: try fa2, then give up on cascade
                log.warning("cascade plan with FlashInfer backend %r failed: %s", backend, e)
                self._wrapper = None
                self.prefill_backend = "fa2"
        self._disabled = "FlashInfer cascade plan failed; flat decode from now on"
        log.warning(self._disabled)
        return False

    # -- running --------------------------------------------------------------
    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        if self._cascade_now:
            return self._wrapper.run(q.contiguous(), (k_cache, v_cache))
        return self.flat.forward(layer, q, k_cache, v_cache)

    @property
    def last_step_was_cascade(self) -> bool:
        return self._cascade_now


# -- installing on an engine --------------------------------------------------------------
def enable_cascade(target: Any, mode: str = "auto", **kwargs: Any) -> CascadeBackend:
    """Put a `CascadeBackend` in front of the flat FlashInfer backend of an
    `Engine` (or a `ModelRunner`); returns it. Idempotent: an installed cascade
    backend just gets the new `mode`.

    The runner's `build_metadata` is wrapped (an instance attribute, the
    class is untouched) to hand the step's host page tables to the backend.
    """
    runner = getattr(target, "runner", target)
    current = runner.backend
    if isinstance(current, CascadeBackend):
        current.mode = mode
        return current
    if not hasattr(current, "workspace") or not hasattr(current, "fi"):
        raise ValueError(f"cascade attention needs the FlashInfer backend, not "
                         f"{type(current).__name__} (attention='flashinfer' on CUDA)")
    cb = CascadeBackend(current, mode=mode, **kwargs)
    build = runner.build_metadata

    def build_metadata(positions, slot_mapping, qo_indptr, kv_indptr, kv_indices,
                       kv_last_page_len, *args, **kw):
        cb.hint_host_indices(kv_indptr, kv_indices)
        return build(positions, slot_mapping, qo_indptr, kv_indptr, kv_indices,
                     kv_last_page_len, *args, **kw)

    build_metadata._dendrite_cascade_orig = build  # type: ignore[attr-defined]
    runner.build_metadata = build_metadata
    runner.backend = cb
    runner.model.backend = cb
    return cb


def disable_cascade(target: Any) -> None:
    """Undo `enable_cascade`: the flat backend again, the plain build_metadata."""
    runner = getattr(target, "runner", target)
    cb = runner.backend
    if not isinstance(cb, CascadeBackend):
        return
    orig = getattr(runner.build_metadata, "_dendrite_cascade_orig", None)
    if orig is not None:
        del runner.build_metadata  # the class method shows through again
    runner.backend = cb.flat
    runner.model.backend = cb.flat

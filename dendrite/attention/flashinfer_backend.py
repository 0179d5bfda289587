"""FlashInfer attention backend (GPU, fp16/bf16; FP8 pages) over Dendrite's paged KV cache.

One step = one `plan()` then one `forward()` per layer. `plan()` picks the
wrapper for the step's shape and plans it once; every layer reuses that plan:

* pure decode steps (`meta.is_decode`) go through
  `BatchDecodeWithPagedKVCacheWrapper`;
* prefill / extend / mixed steps go through
  `BatchPrefillWithPagedKVCacheWrapper` with `causal=True`. FlashInfer aligns
  the causal mask to the end of each sequence's KV (query row i of a sequence
  with `qo_len` new tokens and `kv_len` total sees KV positions
  `<= kv_len - qo_len + i`), which is exactly Dendrite's contract because the
  new tokens are the last `qo_len` entries of the sequence's pages.

The cache is passed as the `(k_cache, v_cache)` tuple of
`[num_pages, page_size, Hkv, D]` views (NHD), i.e. `(kv[l, 0], kv[l, 1])`.

Sliding windows (Mistral, some Qwen2 layers) are a plan-time parameter in
FlashInfer, so layers are grouped by window and each group gets its own
wrappers. A window that no sequence of the step has outgrown masks nothing,
so such steps use the full-attention plan (and its already built kernels).

FP8 pages (`kv_dtype=torch.float8_e4m3fn`, dendrite/model/kv_cache.py): every
wrapper is planned with `kv_data_type` float8_e4m3fn and fp16/bf16 queries
(FlashInfer's CUDA-core decode and its fa2 prefill convert the pages to the
query dtype in the kernel; its fa3 kernels would need FP8 queries, so "auto"
resolves to fa2). A layer's scales (`kv_scales`) go to `run()` as FlashInfer's
`k_scale` (folded into the softmax scale on the host) and `v_scale` (an
`out *= v_scale` after the kernel, skipped when the scale is 1, as calibrated
scales usually are). The graph wrappers take the same two arguments.

FlashInfer is optional: it is imported only when a backend is built, so CPU
installs never touch it. `flashinfer_available()` answers whether it can run.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from dendrite.model.kv_cache import KVScales

__all__ = ["FlashInferBackend", "GraphCascadeWrapper", "GraphDecodeWrapper", "PlanFence", "flashinfer_available",
           "import_flashinfer", "scale_kwargs", "DEFAULT_WORKSPACE_BYTES"]

log = logging.getLogger(__name__)

#: 128 MiB, FlashInfer's recommended float workspace (split-KV partials).
DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024

#: Activation / KV dtypes FlashInfer's kernels are built for here.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Page dtypes besides the activation dtype (read with fp16/bf16 queries).
FP8_KV_DTYPES = (torch.float8_e4m3fn,)


def scale_kwargs(kv_scales: KVScales | None, layer: int) -> dict[str, float]:
    """`k_scale` / `v_scale` keyword arguments of a FlashInfer `run()` for
    `layer`, leaving out a scale of 1 (nothing to fold)."""
    if kv_scales is None:
        return {}
    kw = {}
    if kv_scales.k[layer] != 1.0:
        kw["k_scale"] = float(kv_scales.k[layer])
    if kv_scales.v[layer] != 1.0:
        kw["v_scale"] = float(kv_scales.v[layer])
    return kw


def import_flashinfer() -> Any:
    """Import FlashInfer lazily; raise ImportError with an install hint."""
    try:
        import flashinfer  # noqa: PLC0415  (optional, heavy import)
    except ImportError as e:
        raise ImportError(
            "the FlashInfer attention backend needs `flashinfer-python` "
            "(pip install 'dendrite[gpu]'); use attention='reference' otherwise") from e
    return flashinfer


def flashinfer_available(device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> bool:
    """True when FlashInfer imports, CUDA is up and `dtype` (if given) is supported.

    Used by `attention="auto"`: FlashInfer on CUDA in fp16/bf16, otherwise the
    torch reference backend.
    """
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return False
    try:
        import_flashinfer()
    except Exception:  # a broken install (missing CUDA libs) is "not available" too
        return False
    return True


def _host_i32(t: torch.Tensor) -> torch.Tensor:
    """CPU int32 copy of an index tensor (no-op when it already is one).

    FlashInfer's `plan()` reads indptr / last_page_len on the host to build its
    schedule; handing it CPU tensors avoids a hidden device->host sync.
    """
    if t.device.type == "cpu" and t.dtype == torch.int32:
        return t
    return t.to(device="cpu", dtype=torch.int32)


def _host_field(meta: Any, name: str) -> torch.Tensor:
    """`meta.host.<name>` when the metadata carries host mirrors, else a copy."""
    host = getattr(meta, "host", None)
    t = getattr(host, name, None) if host is not None else None
    return _host_i32(t if t is not None else getattr(meta, name))


class PlanFence:
    """Keeps a FlashInfer wrapper from being re-planned while its last plan is in flight.

    `plan()` writes the step's schedule into the wrapper's pinned host buffer
    and queues an asynchronous copy of it to the device. Re-planning rewrites
    that pinned buffer, so if the GPU has not reached the previous copy yet
    (the host runs ahead through steps that need no result, such as the
    chunks of a long prefill), the earlier step would read the later step's
    schedule with its own page tables: an illegal memory access. `before()`
    waits until the GPU has passed the previous plan's copy, which keeps the
    host at most one step ahead of the device.
    """

    def __init__(self) -> None:
        self._events: dict[int, torch.cuda.Event] = {}

    def before(self, wrapper: Any) -> None:
        """Wait until the last step that used `wrapper` is done before re-planning it."""
        event = self._events.get(id(wrapper))
        if event is not None:
            event.synchronize()

    def after(self, wrapper: Any) -> None:
        """Record on the current stream that `wrapper` was just used."""
        event = self._events.get(id(wrapper))
        if event is None:
            event = self._events[id(wrapper)] = torch.cuda.Event()
        event.record()


class _WindowGroup:
    """The layers sharing one sliding window, with their own pair of wrappers."""

    def __init__(self, window: int | None, layers: list[int]) -> None:
        self.window = window  # None = full attention
        self.layers = layers
        self.prefill: Any = None
        self.decode: Any = None


class FlashInferBackend:
    """AttentionBackend over FlashInfer's paged prefill and decode wrappers.

    Args:
        num_heads: query heads per token (Hq).
        num_kv_heads: KV heads (Hkv); Hq must be a multiple (GQA).
        head_dim: D.
        page_size: tokens per KV page.
        dtype: activation and KV dtype (fp16 or bf16).
        device: CUDA device.
        sm_scale: softmax scale; default 1/sqrt(D).
        sliding_windows: per-layer window (None = full attention), HF's
            convention: a token sees itself and the `w - 1` tokens before it.
        workspace: optional shared uint8 float workspace; allocated otherwise.
        prefill_backend: FlashInfer prefill backend ("auto" picks fa3 on
            Hopper); when "auto" fails to build we fall back to "fa2".
        decode_tensor_cores: run decode through the tensor-core (prefill)
            kernels. Off by default: at small batch the CUDA-core decode
            kernel is as fast, and it JIT-builds in seconds.
        kv_dtype: the pages' dtype: None (= `dtype`) or float8_e4m3fn.
        kv_scales: the FP8 pool's per-layer `KVScales` (None: unit scales).
    """

    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 page_size: int = 16, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cuda", sm_scale: float | None = None,
                 sliding_windows: Sequence[int | None] | None = None,
                 workspace: torch.Tensor | None = None, prefill_backend: str = "auto",
                 decode_tensor_cores: bool = False, kv_dtype: torch.dtype | None = None,
                 kv_scales: KVScales | None = None) -> None:
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"FlashInfer backend supports float16/bfloat16, not {dtype}")
        if kv_dtype is not None and kv_dtype != dtype and kv_dtype not in FP8_KV_DTYPES:
            raise ValueError(f"kv_dtype must be None, {dtype} or torch.float8_e4m3fn, "
                             f"got {kv_dtype}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.fi = import_flashinfer()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.kv_dtype = kv_dtype if kv_dtype is not None else dtype
        self.kv_scales = kv_scales
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_windows = list(sliding_windows) if sliding_windows is not None else None
        self.decode_tensor_cores = decode_tensor_cores
        self._prefill_backend = prefill_backend
        # One float workspace for every wrapper: kernels run one after the
        # other on one stream and the workspace is scratch within a run only.
        self.workspace = workspace if workspace is not None else torch.zeros(
            DEFAULT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._full = _WindowGroup(None, [])
        self._groups: dict[int, _WindowGroup] = {}  # window -> group
        for layer, w in enumerate(self.sliding_windows or []):
            if w is None:
                self._full.layers.append(layer)
            else:
                self._groups.setdefault(int(w), _WindowGroup(int(w), [])).layers.append(layer)
        self._layer_wrapper: dict[int, Any] = {}
        self._default_wrapper: Any = None
        self.fence = PlanFence()

    # -- wrappers -------------------------------------------------------------
    def _prefill_wrapper(self, g: _WindowGroup) -> Any:
        if g.prefill is None:
            g.prefill = self.fi.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", backend=self._prefill_backend)
        return g.prefill

    def _decode_wrapper(self, g: _WindowGroup) -> Any:
        if g.decode is None:
            g.decode = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=self.decode_tensor_cores)
        return g.decode

    # -- planning -------------------------------------------------------------
    def plan(self, meta: Any) -> None:
        """Plan the step described by `meta` once; all layers share it."""
        kv_indptr = _host_field(meta, "kv_indptr")
        kv_last = _host_field(meta, "kv_last_page_len")
        kv_lens = _host_field(meta, "kv_lens")
        qo_indptr = None if meta.is_decode else _host_field(meta, "qo_indptr")
        max_kv = int(kv_lens.max()) if kv_lens.numel() else 0

        def plan_group(g: _WindowGroup, window: int | None) -> Any:
            window_left = -1 if window is None else window - 1
            if meta.is_decode:
                w = self._decode_wrapper(g)
                self.plan_decode(w, kv_indptr, meta.kv_indices, kv_last, window_left=window_left)
            else:
                w = self._plan_prefill(g, qo_indptr, kv_indptr, meta.kv_indices, kv_last,
                                       window_left)
            return w

        # Full attention, also for every window no sequence has outgrown yet.
        full = plan_group(self._full, None)
        self._default_wrapper = full
        self._layer_wrapper = {}
        for g in self._groups.values():
            if max_kv > g.window:
                w = plan_group(g, g.window)
                self._layer_wrapper.update((layer, w) for layer in g.layers)

    def plan_decode(self, wrapper: Any, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor, window_left: int = -1) -> None:
        """Plan any decode wrapper (e.g. a CUDA-graph one) with this backend's shapes.

        `kv_indptr` / `kv_last_page_len` should be CPU tensors (no sync);
        `kv_indices` may live on the device (FlashInfer copies it device-side).
        """
        self.fence.before(wrapper)
        wrapper.plan(_host_i32(kv_indptr), kv_indices, _host_i32(kv_last_page_len),
                     self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                     window_left=window_left, q_data_type=self.dtype,
                     kv_data_type=self.kv_dtype, sm_scale=self.sm_scale)
        self.fence.after(wrapper)

    def _plan_prefill(self, g: _WindowGroup, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                      kv_indices: torch.Tensor, kv_last: torch.Tensor, window_left: int) -> Any:
        args = (qo_indptr, kv_indptr, kv_indices, kv_last,
                self.num_heads, self.num_kv_heads, self.head_dim, self.page_size)
        kwargs = dict(causal=True, window_left=window_left, q_data_type=self.dtype,
                      kv_data_type=self.kv_dtype, sm_scale=self.sm_scale)
        w = self._prefill_wrapper(g)
        try:
            self.fence.before(w)
            w.plan(*args, **kwargs)
            self.fence.after(w)
        except Exception as e:  # the JIT build of the Hopper (fa3) kernels can fail
            if self._prefill_backend != "auto":
                raise
            log.warning("FlashInfer prefill backend 'auto' failed (%s); falling back to fa2", e)
            self._prefill_backend = "fa2"
            for grp in (self._full, *self._groups.values()):
                grp.prefill = None
            w = self._prefill_wrapper(g)
            w.plan(*args, **kwargs)
            self.fence.after(w)
        return w

    # -- running --------------------------------------------------------------
    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Attention of `q` [T, Hq, D] over the planned pages; returns [T, Hq, D]."""
        w = self._layer_wrapper.get(layer, self._default_wrapper)
        if w is None:
            raise RuntimeError("FlashInferBackend.forward called before plan()")
        return w.run(q.contiguous(), (k_cache, v_cache), **scale_kwargs(self.kv_scales, layer))


class GraphDecodeWrapper:
    """A FlashInfer decode wrapper in CUDA-graph mode, for one fixed batch size.

    The captured kernels read `indptr`, `indices` and `last_page_len` from
    these fixed-address buffers and FlashInfer's schedule from the wrapper's
    int workspace; `plan()` (outside the graph) rewrites both, so a replay
    attends over the new step's pages.

    FlashInfer's decode schedule (work split, tile indices) is a function of
    the batch size and the pages per row (`indptr`) only, not of the page ids
    or the last page's fill. So when `indptr` equals the last planned one --
    15 of every 16 decode steps of a sequence -- `plan()` only refreshes the
    page ids and last-page lengths and skips FlashInfer's planner (and its
    pinned-buffer copy), which is most of the host cost of a step.
    """

    def __init__(self, backend: FlashInferBackend, batch_size: int, max_pages: int,
                 skip_redundant_plans: bool = True) -> None:
        dev = backend.device
        self.skip_redundant_plans = skip_redundant_plans
        self._planned_indptr: bytes | None = None
        self.plans = 0  # FlashInfer planner calls (for tests and benchmarks)
        self.backend = backend
        self.batch_size = batch_size
        self.max_pages = max_pages
        self.indptr = torch.arange(batch_size + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        self.last_page_len = torch.ones(batch_size, dtype=torch.int32, device=dev)
        self.wrapper = backend.fi.BatchDecodeWithPagedKVCacheWrapper(
            backend.workspace, "NHD", use_cuda_graph=True,
            use_tensor_cores=backend.decode_tensor_cores,
            paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len)

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor) -> None:
        """Plan outside the graph; CPU indptr / last_page_len avoid a sync."""
        indptr, last = _host_i32(kv_indptr), _host_i32(kv_last_page_len)
        key = indptr.numpy().tobytes()
        if self.skip_redundant_plans and key == self._planned_indptr:
            n = int(kv_indices.shape[0])
            self.indices[:n].copy_(kv_indices, non_blocking=True)
            self.last_page_len.copy_(last, non_blocking=True)
            return
        self.backend.plan_decode(self.wrapper, indptr, kv_indices, last)
        self._planned_indptr = key
        self.plans += 1

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            return_lse: bool = False, **scales: float) -> Any:
        """Decode attention of `q` over the planned pages (with its LSE when asked);
        `scales`: FP8 pages' `k_scale` / `v_scale` (`scale_kwargs`)."""
        return self.wrapper.run(q.contiguous(), (k_cache, v_cache), return_lse=return_lse,
                                **scales)


class GraphCascadeWrapper:
    """Two-level cascade attention for one fixed batch size, in CUDA-graph mode.

    Level 0 is the pages every row shares, as ONE entry that all B queries
    attend together (FlashInfer's paged prefill kernel, non-causal): the
    shared prefix is read once per step instead of once per row. Level 1 is
    each row's own pages (a `GraphDecodeWrapper`). The two partial softmaxes
    are merged with `merge_state_in_place`. All three kernels read fixed
    buffers, so the step can be captured once and replayed; `plan()` runs
    outside the graph.

    FlashInfer's prefill planner in CUDA-graph mode always splits the KV and
    pads the grid to a size fixed by the batch, so one capture serves every
    shared length. Its schedule depends on the shared page count only, so a
    plan with an unchanged count just refreshes the page ids.
    """

    def __init__(self, backend: FlashInferBackend, batch_size: int, max_pages: int,
                 skip_redundant_plans: bool = True) -> None:
        dev = backend.device
        i32 = torch.int32
        self.backend = backend
        self.batch_size = batch_size
        self.skip_redundant_plans = skip_redundant_plans
        self.qo_indptr = torch.tensor([0, batch_size], dtype=i32, device=dev)
        self.shared_indptr = torch.tensor([0, 1], dtype=i32, device=dev)
        self.shared_indices = torch.zeros(max_pages, dtype=i32, device=dev)
        self.shared_last = torch.full((1,), backend.page_size, dtype=i32, device=dev)
        self.shared = backend.fi.BatchPrefillWithPagedKVCacheWrapper(
            backend.workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr,
            paged_kv_indptr_buf=self.shared_indptr, paged_kv_indices_buf=self.shared_indices,
            paged_kv_last_page_len_buf=self.shared_last, backend="fa2")
        self.unique = GraphDecodeWrapper(backend, batch_size, max_pages, skip_redundant_plans)
        self._shared_pages: int | None = None
        self.plans = 0  # FlashInfer planner calls of the shared level

    def plan(self, shared_indices: torch.Tensor, unique_indptr: torch.Tensor,
             unique_indices: torch.Tensor, last_page_len: torch.Tensor) -> None:
        """`shared_indices` [S] full pages common to all rows (device or host);
        the rest is each row's own page table (CPU indptr / last_page_len)."""
        n = int(shared_indices.shape[0])
        if self.skip_redundant_plans and n == self._shared_pages:
            self.shared_indices[:n].copy_(shared_indices, non_blocking=True)
        else:
            b = self.backend
            i32 = torch.int32
            b.fence.before(self.shared)
            self.shared.plan(torch.tensor([0, self.batch_size], dtype=i32),
                             torch.tensor([0, n], dtype=i32), shared_indices,
                             torch.tensor([b.page_size], dtype=i32), b.num_heads,
                             b.num_kv_heads, b.head_dim, b.page_size, causal=False,
                             sm_scale=b.sm_scale, q_data_type=b.dtype,
                             kv_data_type=b.kv_dtype)
            b.fence.after(self.shared)
            self._shared_pages = n
            self.plans += 1
        self.unique.plan(unique_indptr, unique_indices, last_page_len)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            **scales: float) -> torch.Tensor:
        """Cascade attention: shared-prefix and own-suffix parts, merged by their LSEs.

        `scales` (FP8 pages): both levels take them, so both LSEs are the true
        ones and both outputs carry `v_scale`: the merge is unchanged."""
        q = q.contiguous()
        out, lse = self.shared.run(q, (k_cache, v_cache), return_lse=True, **scales)
        own, own_lse = self.unique.run(q, k_cache, v_cache, return_lse=True, **scales)
        self.backend.fi.merge_state_in_place(out, lse, own, own_lse)
        return out

"""Batched token masks: fill on the CPU (GIL released), apply to logits.

Layout (llguidance's, also what the sampler's `allowed=` takes): `int32
[B, ceil(V/32)]`, bit `i % 32` of word `i // 32` set when token `i` is
allowed. llguidance computes masks with the GIL released, so the engine can
fill them on a worker thread (`MaskWorker`) while the GPU forward of the same
step runs; llguidance's own thread pool is opt-in (see `fill_masks`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from .matcher import Matcher

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def _pool_threads() -> int:
    """DENDRITE_GRAMMAR_THREADS: pool size for `fill_masks`; unset or 0 = no pool."""
    return int(os.environ.get("DENDRITE_GRAMMAR_THREADS") or 0)


def _get_executor() -> llguidance.LLExecutor:
    """Process-wide llguidance thread pool."""
    global _executor
    with _executor_lock:
        if _executor is None:
            # Explicit parallel=True without the variable: llguidance's
            # default size (80% of the CPUs, at most 32).
            _executor = llguidance.LLExecutor(_pool_threads() or None)
        return _executor


def fill_masks(
    matchers: Sequence[Matcher],
    bitmask: torch.Tensor,
    rows: Sequence[int] | None = None,
    *,
    parallel: bool | None = None,
) -> None:
    """Write `matchers[i]`'s allowed tokens into `bitmask[rows[i]]`.

    Args:
        matchers: matchers built on the same GrammarTokenizer.
        bitmask: contiguous CPU `int32 [B, tokenizer.mask_words]` (pinned is
            best); rows not named are left untouched (keep them -1 for
            unconstrained sequences).
        rows: target row per matcher; default `range(len(matchers))`.
        parallel: spread the batch over llguidance's thread pool. Default:
            only when DENDRITE_GRAMMAR_THREADS is set (> 0). Measured with
            16 branches of one JSON schema on 16 cores, one after another on
            the calling thread was ~2x faster than the pool (0.30 vs 0.75 ms
            a step): one mask takes ~20 µs, less than the pool's hand-offs,
            and matchers forked from one grammar share a lexer cache that
            parallel threads contend on (see benchmarks/bench_grammar.py).

    Releases the GIL while llguidance computes the masks, either way.
    """
    if not matchers:
        return
    rows = list(range(len(matchers))) if rows is None else [int(r) for r in rows]
    if len(rows) != len(matchers):
        raise ValueError(f"{len(matchers)} matchers but {len(rows)} rows")
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
        raise ValueError("bitmask must be a 2-D int32 CPU tensor")
    if not bitmask.is_contiguous():
        raise ValueError("bitmask must be contiguous")
    batch, words = bitmask.shape
    # llguidance writes a fixed row width; a mismatch would corrupt memory.
    for m in matchers:
        if m.tokenizer.mask_words != words:
            raise ValueError(
                f"bitmask has {words} words per row, tokenizer needs {m.tokenizer.mask_words}"
            )
    for r in rows:
        if not 0 <= r < batch:
            raise IndexError(f"row {r} out of range for batch {batch}")
    row_bytes = words * 4
    if parallel is None:
        parallel = len(matchers) > 1 and _pool_threads() > 0
    if not parallel:
        # On the calling thread, one matcher at a time (each call GIL-free).
        base = bitmask.data_ptr()
        for m, r in zip(matchers, rows):
            m.ll.unsafe_compute_mask_ptr(base + r * row_bytes, row_bytes)
    else:
        # The pool borrows each matcher mutably ("Already borrowed" if one is
        # listed twice): compute each matcher once, then copy its row.
        first: dict[int, int] = {}
        copies: list[tuple[int, int]] = []
        for m, r in zip(matchers, rows):
            if id(m.ll) in first:
                copies.append((first[id(m.ll)], r))
            else:
                first[id(m.ll)] = r
        unique = {id(m.ll): m.ll for m in matchers}
        _get_executor().unsafe_compute_mask_ptr(
            [(unique[k], r) for k, r in first.items()], bitmask.data_ptr(), row_bytes, batch
        )
        for src, dst in copies:
            bitmask[dst] = bitmask[src]
    tok = matchers[0].tokenizer
    if tok.extra_eos_token_ids:
        _alias_extra_eos(bitmask, rows, tok.eos_token_ids[0], tok.extra_eos_token_ids)


def _alias_extra_eos(
    bitmask: torch.Tensor, rows: list[int], primary: int, extra: Sequence[int]
) -> None:
    """Allow each of `extra` exactly where `primary` (llguidance's EOS) is allowed.

    Only for llguidance < 1.7, which knows a single EOS id per tokenizer.
    """
    idx = torch.tensor(rows, dtype=torch.long)
    words = bitmask.shape[1]
    w, b = divmod(primary, 32)
    on = ((bitmask[idx, w] >> b) & 1).bool()
    bits = _bits(bitmask.device)
    for e in extra:
        w, b = divmod(e, 32)
        if w >= words:
            continue  # past the mask: never allowed anyway
        col = bitmask[idx, w]
        bitmask[idx, w] = torch.where(on, col | bits[b], col & ~bits[b])


class MaskWorker:
    """Fills masks on a background thread, to overlap with the GPU forward.

        fut = worker.submit(matchers, bitmask, rows)   # before launching forward
        hidden = model.forward(...)                    # GPU runs; masks fill meanwhile
        fut.result()                                   # then apply_masks / sample

    Matchers must not be advanced until the future is done.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dendrite-grammar")

    def submit(
        self,
        matchers: Sequence[Matcher],
        bitmask: torch.Tensor,
        rows: Sequence[int] | None = None,
        *,
        parallel: bool | None = None,
    ) -> Future[None]:
        rows = None if rows is None else list(rows)
        return self._pool.submit(fill_masks, list(matchers), bitmask, rows, parallel=parallel)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> MaskWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_bit_values: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    """int32 [32] of 1 << k (k = 31 is the sign bit), cached per device."""
    t = _bit_values.get(device)
    if t is None:
        # Build in int64 and wrap to int32 so 1 << 31 becomes the sign bit.
        vals = torch.tensor([1 << k for k in range(32)], dtype=torch.int64)
        t = _bit_values[device] = (vals - (vals >> 31 << 32)).to(torch.int32).to(device)
    return t


def _disallowed(mask: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, n]: True where the packed mask's bit is 0 (n <= 32 * W).

    Two elementwise kernels (and, compare): this runs on the device every
    decode step, so fewer launches matter more than anything else here.
    """
    return ((mask.unsqueeze(-1) & _bits(mask.device)) == 0).flatten(-2)[..., :n]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed `int32 [B, W]` -> bool `[B, vocab_size]` on the bitmask's device.

    Ids past the mask's width (`32 * W`) come out False: a model vocab padded
    beyond the tokenizer's never emits padding ids.
    """
    width = 32 * bitmask.shape[-1]
    allowed = ~_disallowed(bitmask, min(vocab_size, width))
    if vocab_size <= width:
        return allowed
    pad = torch.zeros(
        *allowed.shape[:-1], vocab_size - width, dtype=torch.bool, device=allowed.device
    )
    return torch.cat([allowed, pad], dim=-1)


def apply_masks(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Set disallowed logits to -inf, in place; returns `logits`.

    Args:
        logits: `[N, V]` (any float dtype/device), V the model's vocab.
        bitmask: `int32 [M, W]`, on any device (moved non-blocking).
        rows: which logits row each bitmask row masks (`M` entries); default
            all rows in order (M == N).

    Ids at or past `32 * W` (padding beyond the tokenizer) are always -inf.
    """
    mask = bitmask.to(logits.device, non_blocking=True)
    if rows is None:
        if mask.shape[0] != logits.shape[0]:
            raise ValueError(f"bitmask has {mask.shape[0]} rows, logits {logits.shape[0]}")
        target = logits
    else:
        idx = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
        target = logits[idx]
    vocab, width = target.shape[-1], 32 * mask.shape[-1]
    n = min(vocab, width)
    neg_inf = float("-inf")
    target[..., :n].masked_fill_(_disallowed(mask, n), neg_inf)
    if vocab > width:
        target[..., width:] = neg_inf
    if rows is not None:
        logits[idx] = target
    return logits

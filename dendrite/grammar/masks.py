"""Batched token masks: fill on the CPU (GIL released), unpack, apply to logits.

Layout (llguidance's, also what the sampler's `allowed=` takes): `int32
[B, ceil(V/32)]`, bit `i % 32` of word `i // 32` set when token `i` is
allowed. `fill_masks` writes a batch of matchers' masks; `unpack_bitmask` is
the one place that turns packed masks into bool `[B, V]` (the torch sampler
and `apply_masks` use it; the fused CUDA sampler reads the words directly).

A step's masks are computed while the forward of the same step runs:
`MaskWorker` fills them on its one background thread (with a prefetch right
after the matchers advance), or on the calling thread once an asynchronous
forward is queued. llguidance computes masks with the GIL released either
way; its own thread pool is opt-in (`threads`, see `fill_masks`).

This module sits below matcher.py (whose `fill_mask` calls `fill_masks`), so
it names what it reads of a matcher structurally (`MaskSource`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import llguidance
import torch

if TYPE_CHECKING:
    from .tokenizer import GrammarTokenizer

__all__ = ["Constrained", "MaskSource", "MaskWorker", "apply_masks", "fill_masks",
           "unpack_bitmask"]


class MaskSource(Protocol):
    """What the masks read of a `Matcher`: its llguidance matcher and tokenizer."""

    ll: llguidance.LLMatcher
    tokenizer: GrammarTokenizer


class Constrained(Protocol):
    """One row of a step for `MaskWorker`: its matcher, or None when unconstrained
    (the engine passes its request handles)."""

    @property
    def matcher(self) -> MaskSource | None:
        """The row's grammar matcher, or None when unconstrained."""


# llguidance thread pools by size, shared by the process (each owns threads).
_executors: dict[int, llguidance.LLExecutor] = {}
_executors_lock = threading.Lock()


def _executor(threads: int) -> llguidance.LLExecutor:
    with _executors_lock:
        pool = _executors.get(threads)
        if pool is None:
            pool = _executors[threads] = llguidance.LLExecutor(threads)
        return pool


def _check_threads(where: str, threads: object) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"{where}: threads must be an int, got {threads!r}")
    if threads < 0:
        raise ValueError(f"{where}: threads must be >= 0 (0 = no pool), got {threads}")
    return threads


def fill_masks(
    matchers: Sequence[MaskSource],
    bitmask: torch.Tensor,
    rows: Sequence[int] | None = None,
    *,
    threads: int = 0,
) -> None:
    """Write `matchers[i]`'s allowed tokens into `bitmask[rows[i]]`.

    Args:
        matchers: `Matcher`s built on the same GrammarTokenizer.
        bitmask: contiguous CPU `int32 [B, tokenizer.mask_words]` (pinned is
            best); rows not named are left untouched (keep them -1 for
            unconstrained sequences).
        rows: target row per matcher; default `range(len(matchers))`.
        threads: 0 (default) computes the masks one after another on the
            calling thread; n > 0 spreads a batch of several over a
            process-wide llguidance pool of n threads (the engine takes
            `KernelConfig.grammar_threads`). Measured with 16 branches of one
            JSON schema on 16 cores, the calling thread was ~2x faster than
            the pool (0.30 vs 0.75 ms a step): one mask takes ~20 µs, less
            than the pool's hand-offs, and matchers forked from one grammar
            share a lexer cache that parallel threads contend on (see
            benchmarks/bench_grammar.py).

    Releases the GIL while llguidance computes the masks, either way.
    """
    _check_threads("fill_masks", threads)
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
    if threads == 0 or len(matchers) == 1:
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
        _executor(threads).unsafe_compute_mask_ptr(
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
    """A step's packed masks, filled while the forward of that step runs.

    Rows are given as `Constrained` owners (the engine's request handles): a
    row whose `matcher` is None stays all-allowed (-1), and a step with no
    matcher at all gets None instead of a bitmask. On a CPU forward, which
    holds the calling thread, the masks fill on this worker's one thread:

        worker.prefetch(owners)          # right after their matchers advanced
        ...                              # the rest of the step, the next schedule
        fut = worker.start(owners)       # before the forward (reuses the prefetch)
        logits = forward(...)
        bitmask = fut.result() if fut is not None else None

    After an asynchronous launch (CUDA) the GPU is busy anyway: `fill(owners)`
    computes them on the calling thread and pays no hand-off to a worker that
    would wait for the GIL while the calling thread prepares the step.

    A prefetched row is reused only for the same owner object, and stays valid
    until its matcher advances, which the caller does only after using the
    step's masks; `settle()` waits for a prefetch in flight before the caller
    touches matchers otherwise (a new request, a fork).

    Args:
        pin_memory: allocate pinned bitmasks (CUDA), so the sampler's copy to
            the device is asynchronous: a pageable copy would block the host
            until the forward finished.
        threads: llguidance pool threads per fill (see `fill_masks`).
    """

    def __init__(self, *, pin_memory: bool = False, threads: int = 0) -> None:
        self.pin_memory = pin_memory
        self.threads = _check_threads("MaskWorker", threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dendrite-mask")
        self._prefetch: tuple[list[Constrained], Future[torch.Tensor]] | None = None

    def _empty(self, matcher: MaskSource, rows: int) -> torch.Tensor:
        return matcher.tokenizer.allocate_bitmask(rows, pin_memory=self.pin_memory)

    def fill(self, owners: Sequence[Constrained]) -> torch.Tensor | None:
        """The masks of `owners`, computed on the calling thread."""
        constrained = _constrained(owners)
        if not constrained:
            return None
        rows, matchers = zip(*constrained)
        bitmask = self._empty(matchers[0], len(owners))
        fill_masks(matchers, bitmask, rows, threads=self.threads)
        return bitmask

    def _job(self, matchers: list[MaskSource]) -> Future[torch.Tensor]:
        """Masks of `matchers` (rows in order), filled on the worker thread."""
        def work() -> torch.Tensor:
            bitmask = self._empty(matchers[0], len(matchers))
            fill_masks(matchers, bitmask, threads=self.threads)
            return bitmask

        return self._pool.submit(work)

    def prefetch(self, owners: Sequence[Constrained]) -> None:
        """Start the next step's masks of `owners` now that their matchers advanced.

        The worker then has the rest of this step and the next step's
        scheduling and forward launch to fill them in, instead of only the
        forward. Pass only owners that go on (not finished ones).
        """
        constrained = _constrained(owners)
        live = [owners[i] for i, _ in constrained]
        self._prefetch = (live, self._job([m for _, m in constrained])) if live else None

    def start(self, owners: Sequence[Constrained]) -> Future[torch.Tensor] | None:
        """Future of the masks of `owners`, filled on the worker thread; None
        when no owner has a matcher. Rows prefetched for the same owners are reused."""
        constrained = _constrained(owners)
        if not constrained:
            return None
        prefetched, self._prefetch = self._prefetch, None
        if prefetched is not None and len(constrained) == len(owners) and \
                [id(o) for o in prefetched[0]] == [id(o) for o in owners]:
            return prefetched[1]  # the steady state: same owners, same order
        earlier, ready = prefetched if prefetched is not None else ([], None)
        have = {id(o): j for j, o in enumerate(earlier)}
        hit = [i for i, _ in constrained if id(owners[i]) in have]
        missing = [(i, m) for i, m in constrained if id(owners[i]) not in have]
        missing_job = self._job([m for _, m in missing]) if missing else None
        template = constrained[0][1]

        def assemble() -> torch.Tensor:
            # Runs after the jobs above on the same single worker thread.
            out = self._empty(template, len(owners))
            if ready is not None and hit:
                out[hit] = ready.result()[[have[id(owners[i])] for i in hit]]
            if missing_job is not None:
                out[[i for i, _ in missing]] = missing_job.result()
            return out

        return self._pool.submit(assemble)

    def settle(self) -> None:
        """Wait for a prefetch in flight: its matchers may be touched next."""
        if self._prefetch is not None:
            self._prefetch[1].result()

    def close(self) -> None:
        """Drop the prefetch and stop the worker thread (waits for its jobs)."""
        self._prefetch = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> MaskWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _constrained(owners: Sequence[Constrained]) -> list[tuple[int, MaskSource]]:
    """(row, matcher) of each owner that has a matcher, in row order."""
    return [(i, m) for i, o in enumerate(owners) if (m := o.matcher) is not None]


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
    """Allowed-token mask as bool `[B, vocab_size]`, on the mask's device.

    Takes llguidance's packed `int32 [B, W]` (bit `j` of word `w` allows token
    `32 w + j`) or an already unpacked bool `[B, V']`. Ids past the mask's
    width (`32 * W`, or `V'`) come out False: a model vocab padded beyond the
    tokenizer's never emits padding ids.
    """
    if bitmask.dtype == torch.bool:
        allowed, width = bitmask[..., :vocab_size], bitmask.shape[-1]
    elif bitmask.dtype == torch.int32:
        width = 32 * bitmask.shape[-1]
        allowed = ~_disallowed(bitmask, min(vocab_size, width))
    else:
        raise TypeError(f"allowed-token mask must be packed int32 or bool, not {bitmask.dtype}")
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

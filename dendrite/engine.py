"""The tree engine: every live branch of every request advances in one batched step.

A `Sequence` is a handle on a leaf of the native KV tree plus the tokens not
yet in the KV cache (`pending`). `Sequence.fork(n)` is O(1): the children
share the parent's pages by reference. `Engine.step()` asks the native
scheduler which leaves run (priority order, token budget, chunked prefill),
appends their tokens to the tree in one call (getting slots and copy-on-write
instructions), runs one forward over all of them, and samples for every leaf
whose pending tokens are now all in the cache.

When the page pool runs low the engine first evicts the prefix cache, then
preempts the lowest-priority leaves: a forked leaf gives back the pages of its
own segment and keeps its place under its parent, so it later recomputes only
its own tokens over the still-shared prefix; a leaf whose own segment frees
nothing gives up its whole path. Recomputation yields the same tokens because
a draw depends only on the sequence's seed, position and logits.

Errors. Every value is checked where it enters (`SamplingParams`, token ids,
priorities, fork counts, engine sizes), before any state changes: a rejected
call leaves the engine as it was. A failure that belongs to one request while
the engine steps (its leaf cannot fit the pool: `LeafTooLarge`; the model gave
NaN logits for it: `ModelOutputError`) finishes that request with
`finish_reason="error"` and the exception in `handle.error`; `step()` goes on
with the others, and `run`/`generate` raise the error of the first of their
own requests that failed (the other requests stay submitted and runnable).
`cancel(handle)` ends one request ("abort") and keeps its sequence.

The model side of a step is the runner's: the engine hands `ModelRunner` a
`StepPlan` (tokens, positions, page tables, copy-on-write rows, which rows
sample) and gets the logits of the sampling rows back; whether a CUDA graph
is replayed or the model runs eagerly is decided there. The engine samples
them (`dendrite.sampling`, with the runner's kernel config).

Threads. Public methods hold one re-entrant lock, so several threads may
share an engine: each call runs whole, and a thread's `generate` steps every
request in flight, its own and other threads' (seeded draws do not depend on
the batch, so each thread still gets exactly its tokens).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence as Seq

import numpy as np
import torch

from dendrite.kernels.config import KernelConfig
from dendrite.kv import BlockPool, KVTree, RadixCache, Scheduler
from dendrite.model.runner import ModelRunner, StepPlan
from dendrite.sampling import Sampler, SamplerOutput, SamplingParams
from dendrite.stopping import StopChecker

if TYPE_CHECKING:
    from dendrite.grammar import MaskWorker, Matcher

__all__ = ["Engine", "Sequence", "GenHandle", "GenResult", "LeafTooLarge", "ModelOutputError",
           "MAX_FORK", "TopLogprobs"]

#: Most children one `fork` call makes; a larger fan-out is almost surely a bug
#: (each child is a live leaf with its own bookkeeping).
MAX_FORK = 1 << 16


class LeafTooLarge(MemoryError):
    """One leaf alone needs more KV pages than the pool has.

    `sequence` is the leaf; its request (if any) finished with
    `finish_reason="error"`, and it is parked until something is submitted
    on it again."""

    def __init__(self, message: str, sequence: "Sequence | None" = None) -> None:
        super().__init__(message)
        self.sequence = sequence


class ModelOutputError(FloatingPointError):
    """The model's logits for a request were not finite (bad weights, overflow)."""


def _locked(method: Callable) -> Callable:
    """Run `method` holding the engine's lock (see the module docstring, Threads)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], else a TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_priority(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"priority must be a number, got {value!r} of type "
                        f"{type(value).__name__}")
    if math.isnan(value):
        raise ValueError("priority must be a number, got NaN")
    return float(value)


#: One generated token's alternatives: (token id, logprob) of the n best, best first.
TopLogprobs = list[tuple[int, float]]


@dataclass
class GenResult:
    """What one generation request produced.

    `logprobs[i]` is the model's logprob of `token_ids[i]`, sampled or not:
    a token the grammar forced (appended without sampling) is scored from
    the logits of the forward that consumes it, so the request finishes only
    once its forced tokens have run (NaN for one that never ran: a request
    cancelled, released or failed first). With `SamplingParams.logprobs = n > 0`,
    `top_logprobs[i]` lists the n most likely tokens at that position with
    their logprobs, best first, as OpenAI's `top_logprobs`; None when not
    asked for.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    #: "stop" | "eos" | "length" | "grammar" | "abort" | "error" | "scored" (`submit_score`)
    finish_reason: str
    complete: bool  # False when cut by max_tokens (or a grammar not accepted)
    top_logprobs: list[TopLogprobs] | None = None
    #: With finish_reason "stop": the stop string that matched, or the stop
    #: token id; None otherwise. `text` ends before that string (after it
    #: with `SamplingParams.include_stop`); `token_ids` keep every sampled
    #: token, so the sequence holds the stop string's tokens either way.
    matched_stop: str | int | None = None

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the generated tokens' logprobs."""
        return float(sum(self.logprobs))


@dataclass
class GenHandle:
    """A generation request on one sequence; `result` is set once it finishes."""

    seq: "Sequence"
    params: SamplingParams
    constraint: object | None = None
    matcher: Matcher | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    #: Per token so far, its alternatives (see `GenResult.top_logprobs`); empty
    #: unless `params.logprobs > 0`.
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    result: GenResult | None = None
    stop: StopChecker | None = None
    error: BaseException | None = None  # why it finished with "error"
    #: Tokens appended without sampling whose logprobs are not known yet:
    #: (index in `token_ids`, absolute position in the sequence).
    owed: list[tuple[int, int]] = field(default_factory=list)
    #: (finish_reason, complete) of a request that ended while `owed` was not
    #: empty: it finishes so once the forward scoring those tokens has run.
    finishing: tuple[str, bool] | None = None

    @property
    def done(self) -> bool:
        """Whether the generation has finished (its result is set)."""
        return self.result is not None


@dataclass
class _Launched:
    """A step whose forward and sampling are queued and whose tokens are unread."""

    step: int  # the engine step number, for error messages
    seqs: list["Sequence"]  # the step's leaves, in row order
    handles: list[GenHandle]  # the requests that sample, in row order
    tokens: torch.Tensor | None  # their sampled ids, on the device
    host: Callable[[], SamplerOutput] | None  # waits for the host copies
    allowed: torch.Tensor | None  # the grammar masks used
    #: Owed tokens this step scores: (handle, index in its token_ids), and
    #: their logprobs (float32 [M]) and top alternatives (ids, logprobs
    #: [M, n], or None when no such request asks), on the device.
    scored: list[tuple[GenHandle, int]] = field(default_factory=list)
    scored_lps: torch.Tensor | None = None
    scored_top: tuple[torch.Tensor, torch.Tensor] | None = None
    #: Every row feeds one token: a decode step (the speculative rule times these).
    decode: bool = False


class Sequence:
    """A leaf of the KV tree: the tokens in the cache plus `pending` ones."""

    def __init__(self, engine: "Engine", node: int, pending: list[int], priority: float) -> None:
        self._engine = engine
        self.error: BaseException | None = None  # why it was parked (LeafTooLarge)
        self.node = node
        self.pending: list[int] = pending
        self._priority = priority
        self.handle: GenHandle | None = None
        self.frozen = False  # the node has children: continue on a fresh child
        self.released = False
        self.matcher = None  # grammar state of the last constrained generation
        self.swapped = False  # preempted while idle: not prefilled until used again
        self.waited = 0  # consecutive steps runnable but not scheduled
        self.preemptions = 0

    # -- content ---------------------------------------------------------
    @property
    def num_cached(self) -> int:
        """Tokens already in the KV cache."""
        return self._engine.tree.num_tokens(self.node)

    @property
    def num_tokens(self) -> int:
        """All tokens: cached plus pending (appended, not yet prefilled)."""
        return self.num_cached + len(self.pending)

    @property
    def schedulable(self) -> int:
        """Pending tokens the next steps may prefill. An idle sequence keeps its
        last token pending: whoever generates next (it, or a forked child)
        runs that token and gets the next-token logits from it."""
        if self.handle is not None and not self.handle.done and self.handle.finishing is None:
            return len(self.pending)
        return max(len(self.pending) - 1, 0)

    @property
    def tokens(self) -> list[int]:
        """The sequence's token ids, cached then pending."""
        return self._engine.tree.tokens(self.node).tolist() + self.pending

    @property
    def text(self) -> str:
        """The sequence's tokens decoded (special tokens kept)."""
        return self._engine.tokenizer.decode(self.tokens, skip_special_tokens=False)

    @property
    def priority(self) -> float:
        """Scheduling priority: higher runs first and is preempted last."""
        return self._priority

    @priority.setter
    def priority(self, value: float) -> None:
        value = _check_priority(value)
        with self._engine._lock:
            self._engine.scheduler.set_priority(self.node, value)
            self._priority = value

    # -- tree operations ---------------------------------------------------
    def append_text(self, text: str) -> None:
        """Append `text` (encoded without special tokens) to the pending tokens."""
        self.append_tokens(self._engine.tokenizer.encode(text, add_special_tokens=False))

    def append_tokens(self, ids: Iterable[int]) -> None:
        """Append token ids to the pending tokens (prefilled by the next step)."""
        self._engine._append_tokens(self, ids)

    def fork(self, n: int) -> list["Sequence"]:
        """`n` children sharing this sequence's KV, O(1) each."""
        return self._engine.fork(self, n)

    def release(self) -> None:
        """Give the branch back; pages return to the pool when unreferenced."""
        self._engine.release(self)

    def _check_live(self) -> None:
        if self.released:
            raise RuntimeError("sequence was released")

    def __repr__(self) -> str:
        return (f"Sequence(node={self.node}, cached={self.num_cached}, "
                f"pending={len(self.pending)}, priority={self._priority})")


class Engine:
    """Batched generation over a KV tree of forkable sequences.

    `model_dir`, `device`, `dtype`, `num_pages`, `page_size`, `attention`,
    `cuda_graphs`, `cascade`, `kernels` and `kv_dtype` (None / "auto": the
    model dtype, or "fp8_e4m3") build the engine's `ModelRunner`
    (see there); with a ready `runner` they are not used. `speculative` (a
    `dendrite.speculative.SpeculativeConfig`, default None: off) turns on
    speculative decoding (docs/speculative.md). `tensor_parallel=N`
    shards the model over N processes, one per device (dendrite.parallel);
    this process is rank 0 and holds the engine. `quantization` (None: as
    the checkpoint is; "none", "fp8", "mxfp8") stores the attention and MLP
    projections as FP8 (dendrite/quant, docs/quantization.md);
    `quantize_lm_head=True` the output projection too.
    """

    def __init__(self, model_dir: str | Path | None = None, *, device: str | None = None,
                 dtype: torch.dtype | str | None = None, num_pages: int | None = None,
                 page_size: int = 16, attention: str = "auto", max_batch_tokens: int = 2048,
                 prefix_cache: bool = True, max_wait_steps: int = 64,
                 cuda_graphs: bool = True, cascade: str = "auto",
                 lookahead: bool | None = None, kernels: KernelConfig | None = None,
                 kv_dtype: str | None = None,
                 quantization: str | None = None,
                 quantize_lm_head: bool = False,
                 speculative: object | None = None,
                 runner: ModelRunner | None = None, tensor_parallel: int = 1) -> None:
        # Sizes are checked before the model loads: a typo costs no load time.
        max_batch_tokens = _check_int("max_batch_tokens", max_batch_tokens, 1)
        max_wait_steps = _check_int("max_wait_steps", max_wait_steps, 1)
        page_size = _check_int("page_size", page_size, 1)
        if num_pages is not None:
            num_pages = _check_int("num_pages", num_pages, 1)
        if cascade not in ("auto", "always", "never"):
            raise ValueError(f"cascade must be 'auto', 'always' or 'never', got {cascade!r}")
        if speculative is not None and not hasattr(speculative, "attach"):
            raise TypeError(f"speculative must be a dendrite.speculative.SpeculativeConfig or "
                            f"None (SpeculativeConfig.parse reads 'ngram:k=4'), got "
                            f"{type(speculative).__name__}")
        tensor_parallel = _check_int("tensor_parallel", tensor_parallel, 1)
        if tensor_parallel > 1 and speculative is not None:
            # (Its tree commit copies pages through the runner's own KV pool,
            # which a tensor-parallel runner shards over processes.)
            raise ValueError("speculative decoding with tensor_parallel > 1 is not supported "
                             "yet; pass speculative=None or tensor_parallel=1")
        if tensor_parallel > 1 and runner is not None:
            raise ValueError("tensor_parallel applies to the runner the engine builds; "
                             "with a ready runner leave it at 1")
        self._lock = threading.RLock()
        # A runner built here is closed by `close` (tensor parallel: its processes).
        self._own_runner = runner is None
        if runner is None:
            if model_dir is None:
                model_dir = os.environ.get("DENDRITE_MODEL")
            if model_dir is None:
                from dendrite.default_model import default_model_dir

                model_dir = default_model_dir()
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            # Decode steps whose leaves share a long prefix replay a cascade graph
            # ("auto": when the graph rule says it is faster; "always"; "never").
            if tensor_parallel > 1 and (quantization not in (None, "none") or quantize_lm_head):
                raise ValueError(f"quantization={quantization!r} is not supported with "
                                 "tensor_parallel > 1 yet (FP8 weights are not sharded)")
            if tensor_parallel > 1:  # one process per device; this one is rank 0
                if kv_dtype not in (None, "auto"):
                    raise ValueError(f"kv_dtype={kv_dtype!r} with tensor_parallel > 1 is not "
                                     "supported yet (its runner builds model-dtype KV pages)")
                from dendrite.parallel import start_tensor_parallel

                runner = start_tensor_parallel(
                    model_dir, tensor_parallel, device=device, dtype=dtype,
                    num_pages=num_pages, page_size=page_size, attention=attention,
                    kernels=kernels, cuda_graphs=cuda_graphs, cascade=cascade)
            else:
                runner = ModelRunner(model_dir, device=device, dtype=dtype,
                                     num_pages=num_pages, page_size=page_size,
                                     attention=attention, kernels=kernels,
                                     cuda_graphs=cuda_graphs, cascade=cascade,
                                     kv_dtype=kv_dtype, quantization=quantization,
                                     quantize_lm_head=quantize_lm_head)
        self.runner = runner
        self.model_dir = Path(runner.loaded.path)
        self.tokenizer = runner.tokenizer
        self.device = runner.device
        self.page_size = runner.page_size
        self.num_pages = runner.num_pages
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        # (CUDA graphs pad rows into a page of their own: not the allocator's.)
        self.pool = BlockPool(runner.allocatable_pages, self.page_size)
        self.tree = KVTree(self.pool)
        self.cache = RadixCache(self.pool) if prefix_cache else None
        self.max_batch_tokens = max_batch_tokens
        # Strict priority could starve a low-priority leaf behind a stream of
        # better ones; a leaf left out `max_wait_steps` steps in a row jumps
        # the queue (FIFO among such leaves), which bounds every wait.
        self.max_wait_steps = max_wait_steps
        self.scheduler = Scheduler(token_budget=max_batch_tokens, chunk_size=max_batch_tokens)
        self.sampler = Sampler(kernels=runner.kernels)
        self._grammar_tokenizer = None
        self._live: dict[int, Sequence] = {}  # node -> sequence (leaf handles)
        # Grammar masks (built with the grammar tokenizer, on first use): on
        # CUDA computed on this thread after the asynchronous launch, on the
        # CPU on the worker's thread while the forward holds this one.
        self._mask_worker: MaskWorker | None = None
        self._inline_masks = self.device.type == "cuda"
        # Steady decode launches step k+1 before reading step k's tokens (see
        # `_launch_ahead`); default on CUDA, where the host then prepares a
        # step while the GPU runs the previous one.
        self.lookahead = self.device.type == "cuda" if lookahead is None else bool(lookahead)
        self._ahead: _Launched | None = None
        self.stats = {"steps": 0, "forward_tokens": 0, "forks": 0, "preemptions": 0,
                      "prefix_tokens_reused": 0, "fork_seconds": 0.0, "lookahead_steps": 0,
                      "lookahead_rows_wasted": 0, "errors": 0}
        # Speculative decoding (dendrite/speculative): each step first asks
        # `self._spec.try_step()`, which runs a draft-and-verify step or says no.
        self._spec = speculative.attach(self) if speculative is not None else None

    # -- sequences -------------------------------------------------------------
    @_locked
    def new_sequence(self, prompt: str | Seq[int] | None = None, *, priority: float = 0.0,
                     add_bos: bool = True) -> Sequence:
        """A new root sequence; a cached prefix of the prompt is reused, not recomputed."""
        priority = _check_priority(priority)
        ids = self.encode(prompt, add_bos=add_bos) if prompt is not None else []
        node, pending = self._admit(ids)
        seq = Sequence(self, node, pending, priority)
        self._track(seq)
        return seq

    def encode(self, prompt: str | Seq[int], add_bos: bool = True) -> list[int]:
        """Token ids of a text prompt, or a list of ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_bos)
        if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Seq, np.ndarray)):
            raise TypeError(f"prompt must be a str or a sequence of token ids, "
                            f"got {type(prompt).__name__}")
        return self.check_token_ids(prompt, "prompt")

    def check_token_ids(self, ids: Iterable[int], what: str = "token ids") -> list[int]:
        """`ids` as ints, each in [0, vocab_size); else an error naming the first bad one.

        Unchecked, an id past the vocabulary fails deep in the forward and -1
        silently reads the last embedding row."""
        out = []
        vocab = self.runner.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"{what}: token at index {i} must be an int, got {t!r} "
                                f"of type {type(t).__name__}")
            if not 0 <= t < vocab:
                raise ValueError(f"{what}: token id {t} at index {i} is outside the "
                                 f"vocabulary [0, {vocab})")
            out.append(int(t))
        return out

    @property
    def grammar_tokenizer(self):
        """The llguidance view of the tokenizer, built on first constrained request."""
        if self._grammar_tokenizer is None:
            from dendrite.grammar import GrammarTokenizer

            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer.backend,
                                                       sorted(self.eos_token_ids),
                                                       vocab_size=self.runner.vocab_size)
        return self._grammar_tokenizer

    @property
    def _masks(self) -> MaskWorker:
        """The grammar mask worker, made on the first constrained step."""
        if self._mask_worker is None:
            from dendrite.grammar import MaskWorker

            # Pinned on CUDA, so the sampler's copy to the GPU is asynchronous.
            self._mask_worker = MaskWorker(pin_memory=self.device.type == "cuda",
                                           threads=self.runner.kernels.grammar_threads)
        return self._mask_worker

    def _admit(self, ids: list[int]) -> tuple[int, list[int]]:
        # Keep at least one token out of the match: the last prompt token must
        # run through the model to give next-token logits.
        if self.cache is not None and len(ids) > self.page_size:
            arr = np.asarray(ids[:-1], dtype=np.int32)
            n, pages = self.cache.match_prefix(arr, now=time.monotonic())
            if n > 0:
                try:
                    node = self.tree.new_sequence_from_prefix(pages, n, arr[:n])
                finally:
                    self.cache.unpin(pages)
                self.stats["prefix_tokens_reused"] += n
                return node, list(ids[n:])
        return self.tree.new_sequence(), list(ids)

    def _track(self, seq: Sequence) -> None:
        self.scheduler.add(seq.node, seq.priority)  # first: it is the one that can refuse
        self._live[seq.node] = seq

    def _untrack(self, seq: Sequence) -> None:
        self._live.pop(seq.node, None)
        self.scheduler.remove(seq.node)

    @_locked
    def fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """`n` children of `seq` sharing its KV, O(1) each (see `Sequence.fork`)."""
        seq._check_live()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"fork needs an int count, got {n!r} of type {type(n).__name__}")
        if not 1 <= n <= MAX_FORK:
            raise ValueError(f"fork needs 1 <= n <= {MAX_FORK}, got {n}")
        if seq.handle is not None and not seq.handle.done:
            raise RuntimeError("cannot fork a sequence while it is generating")
        self._settle_masks()
        self.flush([seq])  # children share computed KV rather than re-prefill it
        t0 = time.perf_counter()
        kids_nodes = self.tree.fork(seq.node, n)
        self.stats["fork_seconds"] += time.perf_counter() - t0
        self.stats["forks"] += n
        seq.frozen = True
        # The last token stays pending (see Sequence.schedulable): each child
        # computes it itself, which gives that child its next-token logits.
        kids = [Sequence(self, int(c), list(seq.pending), seq.priority) for c in kids_nodes]
        for k in kids:
            if seq.matcher is not None:
                k.matcher = seq.matcher.fork()  # each child continues its own grammar
            self._track(k)
        return kids

    def _thaw(self, seq: Sequence) -> None:
        """A forked parent that grows again continues on a fresh child node."""
        if not seq.frozen:
            return
        old = seq.node
        self._untrack(seq)
        seq.node = int(self.tree.fork(old, 1)[0])
        self.tree.release(old)  # its children keep it alive
        seq.frozen = False
        self._track(seq)

    @_locked
    def _append_tokens(self, seq: Sequence, ids: Iterable[int]) -> None:
        seq._check_live()
        ids = self.check_token_ids(ids, "append_tokens")  # before any change
        if seq.handle is not None and not seq.handle.done:
            raise RuntimeError("cannot append to a sequence while it is generating")
        self._thaw(seq)
        seq.pending.extend(ids)
        seq.error = None

    @_locked
    def release(self, seq: Sequence) -> None:
        """Give `seq` back (aborting its request); pages return when unreferenced."""
        if seq.released:
            return
        if seq.handle is not None and not seq.handle.done:
            self._finish(seq.handle, "abort", complete=False)
        if self.cache is not None and not seq.frozen:
            self._cache_insert(seq)
        self._untrack(seq)
        self.tree.release(seq.node)
        seq.released = True

    @_locked
    def cancel(self, handle: GenHandle) -> bool:
        """End `handle`'s request now, with `finish_reason="abort"`; False if it
        had already finished (then nothing changes).

        The result keeps the tokens generated so far, and so does the sequence,
        which stays live and the caller's: it can be generated on, forked or
        released as after any finished request. A step already queued for the
        request (see `step`) drops its row when it completes.
        """
        if not isinstance(handle, GenHandle):
            raise TypeError(f"cancel needs a GenHandle, got {type(handle).__name__}")
        if handle.seq._engine is not self:
            raise ValueError("cancel: the handle belongs to another engine")
        if handle.done:
            return False
        seq = handle.seq
        self._finish(handle, "abort", complete=False)
        ahead = self._ahead
        if ahead is not None and any(s is seq for s in ahead.seqs):
            # The step launched ahead holds the last token in the cache (its
            # placeholder was filled in); an idle branch keeps it pending, so
            # whoever continues the branch recomputes it for fresh logits.
            self._keep_last_token_pending(seq)
        return True

    def _cache_insert(self, seq: Sequence) -> None:
        n = self.tree.num_tokens(seq.node)
        if n < self.page_size:
            return
        self.cache.insert(self.tree.tokens(seq.node), self.tree.pages(seq.node),
                          now=time.monotonic())

    # -- generation ---------------------------------------------------------------
    @_locked
    def _check_seq(self, seq: object, what: str) -> None:
        """`seq` is a live Sequence of this engine (another engine's would never
        be scheduled here: the caller would step forever)."""
        if not isinstance(seq, Sequence):
            raise TypeError(f"{what}: expected a Sequence (engine.new_sequence), "
                            f"got {type(seq).__name__}")
        if seq._engine is not self:
            raise ValueError(f"{what}: the sequence belongs to another engine")
        seq._check_live()

    def submit(self, seq: Sequence, params: SamplingParams | None = None,
               constraint: object | None = None, continue_grammar: bool = False) -> GenHandle:
        """Queue a generation on `seq`; it runs in the following `step()` calls.

        `constraint` (a `dendrite.grammar.Constraint`) restricts every token;
        with `continue_grammar`, the sequence resumes the grammar state it (or
        the parent it was forked from) stopped in, e.g. after a `max_tokens` cut.
        """
        self._check_seq(seq, "submit")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if seq.handle is not None and not seq.handle.done:
            raise RuntimeError("sequence already has a generation in flight")
        self._settle_masks()
        self._thaw(seq)
        if seq.num_tokens == 0:
            raise ValueError("cannot generate from an empty sequence: give it a prompt")
        matcher = None
        if continue_grammar:
            if seq.matcher is None:
                raise ValueError("continue_grammar: the sequence has no grammar state to resume")
            matcher = seq.matcher
        elif constraint is not None:
            # Compiling validates: a bad grammar fails here, before any page moves.
            constraint.compile(self.grammar_tokenizer)
            matcher = constraint.matcher(self.grammar_tokenizer)
        handle = GenHandle(seq=seq, params=params, constraint=constraint, matcher=matcher)
        handle.stop = StopChecker(self.tokenizer, params.stop_strings, params.stop_token_ids,
                                  self.eos_token_ids if not params.ignore_eos else (),
                                  include_stop=params.include_stop)
        seq.handle = handle
        seq.matcher = matcher
        seq.swapped = False
        seq.error = None
        if params.max_tokens == 0:
            self._finish(handle, "length", complete=False)
        elif handle.matcher is not None:
            self._force(handle)
        return handle

    def generate(self, seqs: Sequence | Seq[Sequence], params: SamplingParams |
                 Seq[SamplingParams] | None = None) -> list[GenResult]:
        """Submit one generation per sequence and step until all are done."""
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(seqs)
        else:
            params = list(params)
            if len(params) != len(seqs):
                raise ValueError(f"generate got {len(seqs)} sequences but {len(params)} "
                                 f"SamplingParams: pass one per sequence, or one for all")
        with self._lock:  # all or none submitted
            for s, p in zip(seqs, params):
                self._check_seq(s, "generate")
                if s.handle is not None and not s.handle.done:
                    raise RuntimeError("sequence already has a generation in flight")
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
                self.check_token_ids(p.stop_token_ids, "stop_token_ids")
            handles = [self.submit(s, p) for s, p in zip(seqs, params)]
        self.run(handles)
        return [h.result for h in handles]

    def run(self, handles: Iterable[GenHandle]) -> None:
        """Step until every handle is done; raise the first one's error, if any failed.

        Each step takes the lock anew, so other threads' calls interleave."""
        handles = list(handles)
        while True:
            for h in handles:
                if h.error is not None:
                    raise h.error
            if all(h.done for h in handles):
                return
            self.step()

    def flush(self, seqs: Iterable[Sequence]) -> None:
        """Step until the given sequences have no pending tokens."""
        seqs = list(seqs)
        with self._lock:
            for s in seqs:
                self._check_seq(s, "flush")
            for s in seqs:
                s.swapped = False
        while True:
            for s in seqs:
                if s.error is not None:
                    raise s.error
            if not any(s.schedulable > 0 and not s.released for s in seqs):
                return
            self.step()

    # -- the step ---------------------------------------------------------------------
    @_locked
    def step(self) -> list[GenHandle]:
        """One batched forward over every runnable leaf; returns finished handles.

        In steady decode the next step is launched before this one's tokens
        are read (`_launch_ahead`), so a call may return while a forward is
        still queued; the next call completes it.
        """
        cur, self._ahead = self._ahead, None
        if cur is None and self._spec is not None:
            finished = self._spec.try_step()
            if finished is not None:
                return finished
        if cur is None:
            plan = self._schedule()
            if not plan:
                return []
            cur = self._launch(plan)
        nxt = self._launch_ahead(cur) if self.lookahead else None
        finished = self._complete(cur, placeholders=nxt is not None)
        self._ahead = nxt
        if self._spec is not None:
            self._spec.note_plain_step(cur)
        return finished

    def _launch(self, plan: list[tuple[Sequence, int]],
                fed: torch.Tensor | None = None) -> "_Launched":
        """Queue the forward and the sampling of `plan`; read nothing back.

        `fed`: the token ids of a step launched ahead, still on the device
        (one per leaf, count 1 each): the tree gets placeholders for them,
        which `_complete` of the previous step overwrites.
        """
        seqs = [p[0] for p in plan]
        counts = np.asarray([p[1] for p in plan], dtype=np.int32)
        starts = np.asarray([s.num_cached for s in seqs], dtype=np.int64)
        nodes = np.asarray([s.node for s in seqs], dtype=np.int64)
        if fed is None:
            flat_tokens = np.fromiter(chain.from_iterable(s.pending[:c] for s, c in plan),
                                      dtype=np.int32, count=int(counts.sum()))
        else:
            flat_tokens = np.zeros(len(seqs), dtype=np.int32)
        appended = self.tree.append_batch(nodes, counts, flat_tokens)
        if fed is None:
            for s, c in plan:
                del s.pending[:c]
        sample_rows = np.asarray([i for i, s in enumerate(seqs) if not s.pending
                                  and s.handle is not None and not s.handle.done
                                  and s.handle.finishing is None],
                                 dtype=np.int64)
        sample_handles = [seqs[i].handle for i in sample_rows]

        # Grammar masks are computed while the forward runs: on CUDA, on this
        # thread right after the (asynchronous) launch; on the CPU, where the
        # forward holds this thread, on a worker thread.
        constrained = any(h.matcher is not None for h in sample_handles)
        mask_future = self._masks.start(sample_handles) \
            if constrained and not self._inline_masks else None

        indptr, indices, last_len = self.tree.export_csr(nodes)
        qo_indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=qo_indptr[1:])
        positions = np.repeat(starts - qo_indptr[:-1], counts) + np.arange(len(flat_tokens))
        scored, score_rows = self._score_rows(plan, starts, qo_indptr)
        step = StepPlan(input_ids=fed if fed is not None else flat_tokens, positions=positions,
                        slot_mapping=appended.slot_mapping, qo_indptr=qo_indptr,
                        kv_indptr=indptr, kv_indices=indices, kv_last_page_len=last_len,
                        copies=appended.copies, sample_rows=sample_rows, score_rows=score_rows)
        logits = self.runner.execute(step)  # (valid until the next execute)
        self.stats["steps"] += 1
        self.stats["forward_tokens"] += int(counts.sum())
        scored_lps = scored_top = None
        if scored:  # fresh tensors: they outlive the logits' buffer
            scored_lps, scored_top = self._score_logits(logits[len(sample_rows):], scored)
            logits = logits[:len(sample_rows)]
        if not sample_handles:
            if mask_future is not None:
                mask_future.result()
            return _Launched(self.stats["steps"], seqs, [], None, None, None,
                             scored, scored_lps, scored_top)
        if self._inline_masks:
            allowed = self._masks.fill(sample_handles) if constrained else None
        else:
            allowed = mask_future.result() if mask_future is not None else None
        # A sampled row's new token goes right after its cached ones.
        sample_pos = (starts + counts)[sample_rows].tolist()
        history = [h.seq.tokens for h in sample_handles] if any(
            h.params.repetition_penalty != 1.0 for h in sample_handles) else None
        out = self.sampler(logits, [h.params for h in sample_handles], sample_pos,
                           prev_tokens=history, allowed=allowed)
        return _Launched(self.stats["steps"], seqs, sample_handles, out.token_ids,
                         out.cpu_async(), allowed, scored, scored_lps, scored_top,
                         decode=bool((counts == 1).all()) and len(sample_handles) == len(seqs))

    @staticmethod
    def _score_rows(plan: list[tuple[Sequence, int]], starts: np.ndarray,
                    qo_indptr: np.ndarray) -> tuple[list[tuple[GenHandle, int]], np.ndarray]:
        """The owed tokens (see `GenHandle.owed`) this step can score: those whose
        previous position is among the step's new tokens, with that token's row."""
        scored: list[tuple[GenHandle, int]] = []
        rows: list[int] = []
        for b, (seq, c) in enumerate(plan):
            h = seq.handle
            if h is None or h.done or not h.owed:
                continue
            start = int(starts[b])
            for idx, pos in h.owed:
                if start <= pos - 1 < start + c:
                    scored.append((h, idx))
                    rows.append(int(qo_indptr[b]) + pos - 1 - start)
        return scored, np.asarray(rows, dtype=np.int64)

    @staticmethod
    def _score_logits(logits: torch.Tensor, scored: list[tuple[GenHandle, int]]
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Logprobs of the scored tokens under `logits` (one row each), and the
        top-n alternatives when a request asks for them (n: the most asked)."""
        lps = torch.log_softmax(logits.float(), dim=-1)
        ids = torch.as_tensor([h.token_ids[i] for h, i in scored], dtype=torch.int64,
                              device=lps.device)
        chosen = lps.gather(1, ids[:, None]).squeeze(1)
        n = min(max(h.params.logprobs for h, _ in scored), lps.shape[1])
        top = None
        if n > 0:
            vals, idx = lps.topk(n, dim=-1)
            top = (idx, vals)
        return chosen, top

    def _launch_ahead(self, cur: "_Launched") -> "_Launched | None":
        """Launch the step after `cur` before `cur`'s tokens are read, if it is certain.

        Only in steady decode: every leaf of `cur` samples and nothing else is
        runnable (so the scheduler would pick exactly these leaves, one token
        each), no grammar or repetition penalty reads the new token on the
        host, no leaf is sure to stop at `cur` (`max_tokens`), and the pages
        are free. Its inputs are `cur`'s sampled ids, fed on the device. A
        leaf that then stops at `cur` (EOS, stop string) drops its row: the
        extra token's slot is truncated away and its result ignored.
        """
        hs = cur.handles
        if not hs or len(hs) != len(cur.seqs) or len(hs) > self.max_batch_tokens:
            return None
        for h in hs:
            if (h.done or h.matcher is not None or h.params.repetition_penalty != 1.0
                    or len(h.token_ids) + 2 > h.params.max_tokens):
                return None
        if self._runnable():
            return None
        if self._spec is not None and self._spec.would_speculate(cur.seqs):
            return None
        nodes = np.asarray([s.node for s in cur.seqs], dtype=np.int64)
        if self.tree.pages_needed(nodes, np.ones(len(nodes), dtype=np.int32)) > self.pool.free:
            return None
        self.stats["lookahead_steps"] += 1
        if self._spec is not None:  # a plain step that try_step never sees
            self.stats["spec_off_steps"] += 1
        return self._launch([(s, 1) for s in cur.seqs], fed=cur.tokens)

    def _complete(self, cur: "_Launched", placeholders: bool) -> list[GenHandle]:
        """Read `cur`'s tokens and advance its requests; returns the finished ones.

        `placeholders`: the next step was launched ahead, so each leaf's new
        token is already in the tree as a placeholder (see `_accept`).
        """
        finished = self._settle_scored(cur) if cur.scored else []
        if not cur.handles:
            return finished
        out = cur.host()
        fixes: list[tuple[int, int]] | None = [] if placeholders else None
        top_ids = top_lps = None
        if out.top_token_ids is not None:
            top_ids, top_lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
        for i, (h, tok, lp) in enumerate(zip(cur.handles, out.token_ids.tolist(),
                                             out.logprobs.tolist())):
            if h.done:  # stopped, cancelled or released while this step was queued
                self.stats["lookahead_rows_wasted"] += 1
                continue
            if math.isnan(lp):
                # NaN anywhere in a row makes its log-softmax NaN: the check is free.
                self._reject_row(h, cur.step, placeholders=fixes is not None)
                finished.append(h)
                continue
            top = None
            if h.params.logprobs > 0:  # (then top_ids is set: the sampler saw this row ask)
                n = h.params.logprobs
                top = list(zip(top_ids[i][:n], top_lps[i][:n]))
            if self._accept(h, tok, lp, top, placeholders=fixes):
                finished.append(h)
        if fixes:
            nodes, toks = zip(*fixes)
            self.tree.set_last_tokens(np.asarray(nodes, dtype=np.int64),
                                      np.asarray(toks, dtype=np.int32))
        if cur.allowed is not None and not self._inline_masks:
            # The next step's masks, now that this step's tokens are consumed.
            self._masks.prefetch([h for h in cur.handles if not h.done])
        return finished

    def _settle_scored(self, cur: "_Launched") -> list[GenHandle]:
        """Record the logprobs `cur` computed for owed tokens; returns the requests
        that were only waiting for them and are now finished (or failed: NaN)."""
        lps = cur.scored_lps.tolist()
        top_ids = top_lps = None
        if cur.scored_top is not None:
            top_ids, top_lps = cur.scored_top[0].tolist(), cur.scored_top[1].tolist()
        touched: dict[int, GenHandle] = {}
        for j, ((h, idx), lp) in enumerate(zip(cur.scored, lps)):
            if h.done:  # cancelled, released or failed meanwhile
                continue
            if math.isnan(lp):
                self._fail(h, ModelOutputError(
                    f"the model produced NaN logits at engine step {cur.step} for a sequence "
                    f"of {h.seq.num_tokens} tokens (scoring generated token {idx}): check the "
                    f"weights (NaN/inf values) or use a wider dtype"))
                self.stats["errors"] += 1
                self._keep_last_token_pending(h.seq)  # (its sampled row, if any, is dropped)
                touched[id(h)] = h
                continue
            h.logprobs[idx] = lp
            if h.params.logprobs > 0:
                n = h.params.logprobs
                h.top_logprobs[idx] = list(zip(top_ids[j][:n], top_lps[j][:n]))
            h.owed = [o for o in h.owed if o[0] != idx]
            touched[id(h)] = h
        finished = []
        for h in touched.values():
            if not h.done and not h.owed and h.finishing is not None:
                self._finish(h, *h.finishing)
            if h.done:  # (then `_complete` skips its sampling row, if any)
                finished.append(h)
        return finished

    def _reject_row(self, h: GenHandle, step: int, placeholders: bool) -> None:
        """Fail a request whose logits were not finite; its sampled token is dropped."""
        seq = h.seq
        if placeholders:  # the token launched ahead is not kept either
            self.tree.truncate(seq.node, seq.num_cached - 1)
        self._keep_last_token_pending(seq)
        self._fail(h, ModelOutputError(
            f"the model produced NaN logits at engine step {step} for a sequence of "
            f"{seq.num_tokens} tokens (position {seq.num_tokens}): check the weights "
            f"(NaN/inf values) or use a wider dtype"))
        self.stats["errors"] += 1

    def _runnable(self) -> list[Sequence]:
        return [s for s in self._live.values() if s.schedulable > 0 and not s.swapped]

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Ask the native scheduler for this step's leaves; preempt if pages run short."""
        runnable = self._runnable()
        if not runnable:
            return []
        for s in runnable:
            if s.waited == self.max_wait_steps:
                self.scheduler.set_priority(s.node, float("inf"))
        nodes = np.asarray([s.node for s in runnable], dtype=np.int64)
        pending = np.asarray([s.schedulable for s in runnable], dtype=np.int32)
        picked, counts = self.scheduler.schedule(nodes, pending)
        plan = [(self._live[int(n)], int(c)) for n, c in zip(picked, counts)]
        while True:
            try:
                plan = self._fit_pages(plan)
                break
            except LeafTooLarge as exc:
                self._park(exc.sequence, exc)
                plan = [(s, c) for s, c in plan if s is not exc.sequence]
        chosen = {id(s) for s, _ in plan}
        for s in runnable:
            if id(s) in chosen:
                if s.waited >= self.max_wait_steps:
                    self.scheduler.set_priority(s.node, s.priority)
                s.waited = 0
            elif not s.released:
                s.waited += 1
        return plan

    def _fit_pages(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Trim the plan to the pages available: evict cached prefixes, then preempt
        the lowest-priority leaves, then defer or shrink work; never fail mid-step."""
        while plan:
            nodes = np.asarray([s.node for s, _ in plan], dtype=np.int64)
            counts = np.asarray([c for _, c in plan], dtype=np.int32)
            need = self.tree.pages_needed(nodes, counts)
            short = need - self.pool.free
            if short <= 0:
                return plan
            if self.cache is not None and self.cache.evict(short) > 0:
                continue
            picked = self._pick_victim(plan)
            if picked is not None:
                victim, whole = picked
                self._preempt(victim, whole)
                plan = [(s, c) for s, c in plan if s is not victim]
                continue
            if len(plan) > 1:
                plan = plan[:-1]  # the plan is in priority order: the last one waits
                continue
            seq, c = plan[0]
            if c > 1:
                plan = [(seq, c // 2)]  # a smaller prefill chunk may still fit
                continue
            raise LeafTooLarge(
                f"a sequence of {seq.num_tokens} tokens needs {need} more KV page(s) but "
                f"{self.pool.free} of {self.num_pages} are free and nothing else can be "
                f"preempted; raise num_pages or shorten the sequence", seq)
        return plan

    def _park(self, seq: Sequence, exc: BaseException) -> None:
        """Take a leaf that cannot run out of the runnable set; its request fails with `exc`.

        It stays parked (its tokens kept) until something is submitted on it again."""
        seq.error = exc
        seq.swapped = True
        if seq.handle is not None and not seq.handle.done:
            self._fail(seq.handle, exc)
        self.stats["errors"] += 1

    def _fail(self, h: GenHandle, exc: BaseException) -> None:
        h.error = exc
        self._finish(h, "error", complete=False)

    def _pick_victim(self, plan: list[tuple[Sequence, int]]) -> tuple[Sequence, bool] | None:
        """The lowest-priority leaf to preempt, never the plan's first, and how.

        Returns (leaf, whole): a leaf whose own segment frees pages gives back
        only that segment (`whole=False`: the prefix it shares stays, so it
        recomputes only its own tokens); failing any such leaf, one whose
        release frees pages gives up its whole path (`whole=True`)."""
        keep = plan[0][0]
        cands = [s for s in self._live.values()
                 if s is not keep and not s.frozen and s.num_cached > 0
                 and s.priority <= keep.priority]
        if not cands:
            return None
        order = [cands[int(i)] for i in
                 self.scheduler.preempt_order(np.asarray([s.node for s in cands], np.int64))]
        for s in order:
            if self._pages_freed_by_truncation(s) > 0:
                return s, False
        for s in order:
            if self.tree.pages_freed_by_release(s.node) > 0:
                return s, True
        return None

    def _segment_start(self, seq: Sequence) -> int:
        """Tokens `seq` reads from its parent: where its own segment begins."""
        parent = self.tree.parent(seq.node)
        return self.tree.num_tokens(parent) if parent >= 0 else 0

    def _pages_freed_by_truncation(self, seq: Sequence) -> int:
        start = self._segment_start(seq)
        if seq.num_cached == start:
            return 0
        # The own segment's pages start at the page holding token `start`
        # (a private copy when the parent's last page was partly filled).
        own = self.tree.pages(seq.node)[start // self.page_size:]
        return sum(self.pool.refcount(int(p)) == 1 for p in own)

    def _preempt(self, seq: Sequence, whole: bool) -> None:
        """Give up the leaf's pages; it recomputes those tokens when it runs again.

        Not `whole`: only its own segment goes, the leaf stays under its parent.
        `whole`: its whole path goes and it re-enters as a new root (a cached
        prefix of it is matched again)."""
        if whole:
            tokens = self.tree.tokens(seq.node).tolist()
            self._untrack(seq)
            self.tree.release(seq.node)
            seq.node, seq.pending = self._admit(tokens + seq.pending)
            self._track(seq)
        else:
            start = self._segment_start(seq)
            own = self.tree.tokens(seq.node)[start:].tolist()
            self.tree.truncate(seq.node, start)
            seq.pending = own + seq.pending
        seq.preemptions += 1
        # An idle branch stays swapped out until someone uses it again.
        seq.swapped = seq.handle is None or seq.handle.done
        self.stats["preemptions"] += 1

    def _settle_masks(self) -> None:
        """Wait for a mask prefetch in flight: its matchers may be touched next."""
        if self._mask_worker is not None:
            self._mask_worker.settle()

    def _accept(self, h: GenHandle, tok: int, lp: float, top: TopLogprobs | None = None,
                placeholders: list[tuple[int, int]] | None = None) -> bool:
        """Record a sampled token (and its alternatives `top`, when the request
        asks for them); returns True when the request finished.

        With `placeholders`, a step launched ahead already appended this token
        to the leaf (its id unknown then): a continuing leaf adds (node, id)
        to the list for the caller to set; a finishing one drops the
        placeholder, and the bookkeeping below is the usual one.
        """
        seq = h.seq
        h.token_ids.append(tok)
        h.logprobs.append(lp)
        if top is not None:
            h.top_logprobs.append(top)
        if h.matcher is not None:
            h.matcher.consume(tok)
        reason = h.stop.check(h.token_ids)
        if placeholders is not None:
            if reason is None and len(h.token_ids) < h.params.max_tokens:
                placeholders.append((seq.node, tok))
                return False
            self.tree.truncate(seq.node, seq.num_cached - 1)
        if reason == "eos":
            h.token_ids.pop()
            h.logprobs.pop()
            if top is not None:
                h.top_logprobs.pop()
            self._keep_last_token_pending(seq)
            self._end(h, "eos", complete=self._grammar_ok(h))
            return h.done
        seq.pending.append(tok)
        if reason is not None:
            self._end(h, reason, complete=self._grammar_ok(h))
            return h.done
        if h.matcher is not None and h.matcher.is_stopped():
            self._end(h, "grammar", complete=self._grammar_ok(h))
            return h.done
        if len(h.token_ids) >= h.params.max_tokens:
            self._end(h, "length", complete=False)
            return h.done
        if h.matcher is not None:
            self._force(h)
            if h.done:
                return True
        return False

    def _keep_last_token_pending(self, seq: Sequence) -> None:
        """EOS is not kept in the context, so the branch's last token must go back
        to pending: whoever continues the branch recomputes it for fresh logits."""
        if seq.pending:
            return
        n = seq.num_cached
        last = int(self.tree.tokens(seq.node)[-1])
        self.tree.truncate(seq.node, n - 1)  # own segment: the leaf computed it itself
        seq.pending.append(last)

    def _force(self, h: GenHandle) -> None:
        """Append the tokens the grammar forces, without sampling: they prefill next step.

        Their logprobs are owed (`GenHandle.owed`): the step that runs each one's
        previous token computes the logits row they come from (`_score_rows`).
        """
        forced = h.matcher.forced_tokens()
        room = h.params.max_tokens - len(h.token_ids)
        for tok in forced[:room]:
            pos = h.seq.num_tokens
            # An idle branch keeps its last token pending, so the previous
            # position still runs; were it cached, the logprob stays NaN.
            if pos - 1 >= h.seq.num_cached:
                h.owed.append((len(h.token_ids), pos))
            h.token_ids.append(tok)
            h.logprobs.append(math.nan)
            if h.params.logprobs > 0:
                h.top_logprobs.append([])
            h.matcher.consume(tok)
            h.seq.pending.append(tok)
        if h.matcher.is_stopped():
            self._end(h, "grammar", complete=self._grammar_ok(h))
        elif len(h.token_ids) >= h.params.max_tokens:
            self._end(h, "length", complete=False)

    def _end(self, h: GenHandle, reason: str, complete: bool) -> None:
        """Finish `h` now, or once its owed logprobs are computed (its branch keeps
        running its pending tokens but the last, as an idle branch would)."""
        if h.owed:
            h.finishing = (reason, complete)
        else:
            self._finish(h, reason, complete)

    @_locked
    def submit_score(self, seq: Sequence, ids: Iterable[int], logprobs: int = 0) -> GenHandle:
        """Append `ids` to `seq` and compute the model's logprob of each, in the
        following `step()` calls (batched with everything else in flight).

        The handle's result has `token_ids == ids`, `logprobs` their logprobs
        (with `logprobs = n > 0`, `top_logprobs` too) and
        `finish_reason="scored"`. The branch keeps the tokens, as after
        `append_tokens`; scoring n continuations of one prompt is `fork(n)`
        then one `submit_score` per child, all in one step.
        """
        self._check_seq(seq, "submit_score")
        ids = self.check_token_ids(ids, "submit_score")
        if not ids:
            raise ValueError("submit_score needs at least one token id to score")
        logprobs = _check_int("logprobs", logprobs, 0)
        if seq.handle is not None and not seq.handle.done:
            raise RuntimeError("sequence already has a generation in flight")
        if seq.num_tokens == 0:
            raise ValueError("submit_score: the sequence is empty; the first token has no "
                             "logprob: give it a prompt")
        self._settle_masks()
        self._thaw(seq)
        handle = GenHandle(seq=seq, params=SamplingParams(max_tokens=len(ids), logprobs=logprobs))
        seq.handle = handle
        seq.swapped = False
        seq.error = None
        for tok in ids:
            pos = seq.num_tokens
            if pos - 1 >= seq.num_cached:
                handle.owed.append((len(handle.token_ids), pos))
            handle.token_ids.append(tok)
            handle.logprobs.append(math.nan)
            if logprobs > 0:
                handle.top_logprobs.append([])
            seq.pending.append(tok)
        self._end(handle, "scored", complete=True)
        return handle

    @staticmethod
    def _grammar_ok(h: GenHandle) -> bool:
        return h.matcher is None or h.matcher.is_accepting()

    def _finish(self, h: GenHandle, reason: str, complete: bool) -> None:
        text = h.stop.final_text(h.token_ids) if h.stop else self.tokenizer.decode(h.token_ids)
        h.owed = []  # (a request ended early keeps NaN for tokens never scored)
        top = list(h.top_logprobs) if h.params.logprobs > 0 else None
        matched = h.stop.matched if h.stop is not None and reason == "stop" else None
        h.result = GenResult(token_ids=list(h.token_ids), text=text, logprobs=list(h.logprobs),
                             finish_reason=reason, complete=complete, top_logprobs=top,
                             matched_stop=matched)

    # -- introspection ---------------------------------------------------------------------
    @_locked
    def memory_stats(self) -> dict:
        """KV page counts (used, free, total, high watermark), bytes per page and
        per token, and the pool's element format ("auto" or "fp8_e4m3")."""
        return {"pages_used": self.pool.used, "pages_free": self.pool.free,
                "pages_total": self.num_pages, "high_watermark": self.pool.high_watermark,
                "bytes_per_page": self.runner.kv_bytes_per_page,
                "kv_bytes_per_token": self.runner.kv_bytes_per_page // self.page_size,
                "kv_dtype": getattr(self.runner, "kv_dtype", "auto")}

    @_locked
    def close(self) -> None:
        """Release every live sequence and stop the grammar mask worker (and the
        tensor-parallel worker processes of a runner the engine built)."""
        for seq in list(self._live.values()):
            self.release(seq)
        if self._mask_worker is not None:
            self._mask_worker.close()
        if self._spec is not None:
            self._spec.close()
            self._spec = None
        close_runner = getattr(self.runner, "close", None) if self._own_runner else None
        if close_runner is not None:
            close_runner()

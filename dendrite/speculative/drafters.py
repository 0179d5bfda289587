"""Drafters: who proposes the draft tokens that the target model then verifies.

One interface, `Drafter.propose(keys, contexts, shape, depths)`: for each row
of a step (its `key` identifies the branch across steps, `contexts[r]` is
its whole token list, last token included) a `DraftTree` of at most
`depths[r]` tokens per path. `ExpandingDrafter` implements `propose` for any
drafter that can say "the k likeliest next tokens after this context + path"
(`expand`): the tree builders of dendrite/speculative/tree.py call it once
per depth for all rows.

* `NgramDrafter`: prompt lookup. The longest suffix (n from `n_max` down to
  `n_min` tokens) of context + path that occurred before; the tokens that
  followed its occurrences are the candidates, by count (then recency), with
  probability count / occurrences. No model, no state.
* `ModelDrafter`: a small model with the same tokenizer, on its own
  `ModelRunner` and KV tree. Each branch keeps a draft KV root holding its
  context (only the new tokens are prefilled from one step to the next);
  each depth is one batched draft forward over the frontier nodes, which are
  forks of that root (O(1), released when the step ends).

Plugging in an EAGLE-style head: subclass `ExpandingDrafter`. `begin(keys,
contexts)` receives the rows of a step; an EAGLE head also needs the
target's last-layer hidden states at the row's last positions, and
`ModelRunner.execute` does not return them today (it computes logits from
`hidden[rows]` and drops `hidden`): the addition is a `StepPlan` flag asking
`execute` to return `hidden[rows]` beside the logits, which the engine's
speculative step would hand to `begin` (see docs/speculative.md). `expand`
then runs the head on (hidden state, token embedding) pairs, one batched
call per depth, exactly as `ModelDrafter` runs its small model.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dendrite.kv import BlockPool, KVTree, OutOfPages
from dendrite.model.runner import ModelRunner, StepPlan
from dendrite.speculative.plan import decode_shaped_plan
from dendrite.speculative.tree import DraftTree, Expansion, Sampled, TreeShape, build
from dendrite.speculative.verify import uniforms_many
from dendrite.transfer import to_device

__all__ = [
    "Drafter",
    "ExpandingDrafter",
    "ModelDrafter",
    "NgramDrafter",
    "TokenizerMismatch",
    "check_same_tokenizer",
    "host_copies",
]

log = logging.getLogger(__name__)

def host_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of `tensors` with one wait: from CUDA the copies are queued
    (into pinned memory) and one event is waited for, not one sync each."""
    if not any(t.is_cuda for t in tensors):
        return [t.cpu() for t in tensors]
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(next(t.device for t in tensors if t.is_cuda)))
    ready.synchronize()
    return out


#: Rows of at most this many new tokens run decode-shaped (see `ModelDrafter._forward`).
DECODE_SHAPED_MAX = 16


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft trees for the rows of a step (see the module docstring)."""

    def propose(self, keys: Sequence[Hashable], contexts: Sequence[Sequence[int]],
                shape: TreeShape, depths: Sequence[int]) -> list[DraftTree]:
        """One `DraftTree` per row; row r's paths hold at most `depths[r]` tokens."""

    def forget(self, key: Hashable) -> None:
        """The branch `key` is gone: drop whatever was kept for it."""


class ExpandingDrafter(ABC):
    """A drafter made of a batched next-token `expand` (see the module docstring)."""

    def propose(self, keys: Sequence[Hashable], contexts: Sequence[Sequence[int]],
                shape: TreeShape, depths: Sequence[int]) -> list[DraftTree]:
        """Trees of `shape` grown with `expand`, between `begin` and `end`."""
        if not keys:
            return []
        self.begin(keys, contexts)
        try:
            return build(self.expand, len(keys), shape, depths)
        finally:
            self.end()

    def begin(self, keys: Sequence[Hashable], contexts: Sequence[Sequence[int]]) -> None:
        """A step's rows; `expand` requests name them by index."""
        self._contexts = contexts

    @abstractmethod
    def expand(self, requests: Sequence[Expansion]) -> list[list[tuple[int, float]]]:
        """Per request, up to `k` (token, probability) candidates, best first."""

    def end(self) -> None:
        """The step's trees are built: drop what only this step needed."""
        self._contexts = ()

    def forget(self, key: Hashable) -> None:
        """Nothing kept per branch by default."""


class NgramDrafter(ExpandingDrafter):
    """Prompt lookup: continue the context the way an earlier match of its suffix went.

    `n_min`..`n_max`: the suffix lengths tried, longest first. `window`: only
    the last `window` tokens are searched (a long context costs O(window)
    per expansion).
    """

    def __init__(self, n_min: int = 1, n_max: int = 3, window: int = 8192) -> None:
        for name, v in (("n_min", n_min), ("n_max", n_max), ("window", window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NgramDrafter: {name} must be an int >= 1, got {v!r}")
        if n_min > n_max:
            raise ValueError(f"NgramDrafter: n_min ({n_min}) must be <= n_max ({n_max})")
        self.n_min, self.n_max, self.window = n_min, n_max, window
        self._arrays: dict[int, np.ndarray] = {}

    def begin(self, keys: Sequence[Hashable], contexts: Sequence[Sequence[int]]) -> None:
        """The step's contexts; their arrays are built on first use."""
        super().begin(keys, contexts)
        self._arrays = {}

    def expand(self, requests: Sequence[Expansion]) -> list[list[tuple[int, float]]]:
        """Prompt lookup after each request's context + path (`lookup`)."""
        out = []
        for req in requests:
            base = self._arrays.get(req.row)
            if base is None:
                base = np.asarray(list(self._contexts[req.row])[-self.window:], dtype=np.int64)
                self._arrays[req.row] = base
            seq = np.concatenate([base, np.asarray(req.path, dtype=np.int64)]) if req.path \
                else base
            out.append(self.lookup(seq, req.k))
        return out

    def lookup(self, seq: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` likeliest next tokens after `seq` by its longest earlier-seen suffix."""
        for n in range(min(self.n_max, len(seq) - 1), self.n_min - 1, -1):
            suffix = seq[-n:]
            # Windows starting at j <= len - 1 - n: each has a token after it.
            win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.nonzero((win == suffix).all(axis=1))[0]
            if len(hits) == 0:
                continue
            nxt = seq[hits + n]
            toks, first, counts = np.unique(nxt[::-1], return_index=True, return_counts=True)
            # Most frequent first; among equals, the most recent occurrence.
            order = sorted(range(len(toks)), key=lambda i: (-counts[i], first[i]))
            total = float(len(nxt))
            return [(int(toks[i]), counts[i] / total) for i in order[:k]]
        return []

    def end(self) -> None:
        """Drop the step's context arrays."""
        super().end()
        self._arrays = {}


class TokenizerMismatch(ValueError):
    """A draft model whose tokenizer is not the target's."""


def check_same_tokenizer(target, draft, draft_name: str = "the draft model") -> None:
    """Raise `TokenizerMismatch` unless `draft` maps every token to the target's id."""
    a = target.backend.get_vocab(with_added_tokens=True)
    b = draft.backend.get_vocab(with_added_tokens=True)
    if a == b and set(target.eos_token_ids) == set(draft.eos_token_ids):
        return
    diff = sorted((t for t in a.keys() | b.keys() if a.get(t) != b.get(t)),
                  key=lambda t: (a.get(t, b.get(t)), t))
    example = (f"; e.g. token {diff[0]!r}: id {a.get(diff[0])} in the target, "
               f"{b.get(diff[0])} in the draft") if diff else \
        (f"; EOS ids differ: target {sorted(target.eos_token_ids)}, "
         f"draft {sorted(draft.eos_token_ids)}")
    raise TokenizerMismatch(
        f"speculative: {draft_name} has another tokenizer than the target model "
        f"({len(a)} vs {len(b)} tokens, {len(diff)} with another id or missing{example}); "
        f"a draft model must use the target's tokenizer")


class ModelDrafter(ExpandingDrafter):
    """A small model drafting for the target, on its own runner and KV tree.

    Args:
        model: a model directory or a ready `ModelRunner` (its tokenizer must
            be the target's: checked against `tokenizer` when given).
        tokenizer: the target's tokenizer, for the same-tokenizer check.
        device, dtype, num_pages, page_size: the draft runner's, when `model`
            is a directory (default: CPU / the loader's dtype / 4096 pages).
        vocab_size: the target's vocabulary; draft candidates past it are dropped.
        temperature: 0 proposes the draft's k best tokens (point masses);
            > 0 draws them from the draft's softmax at that temperature and
            hands the distribution on, for rejection sampling (better
            acceptance when the target samples too).
    """

    def __init__(self, model: str | Path | ModelRunner, *, tokenizer=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 num_pages: int = 4096, page_size: int = 16,
                 vocab_size: int | None = None, temperature: float = 0.0) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 <= temperature < float("inf"):
            raise ValueError(f"ModelDrafter: temperature must be a finite number >= 0 "
                             f"(0: the draft's best tokens), got {temperature!r}")
        self.temperature = float(temperature)
        if isinstance(model, ModelRunner):
            runner = model
        else:
            if tokenizer is not None:
                from dendrite.model.tokenizer import Tokenizer

                # Checked before the weights load: a wrong pair costs no load time.
                check_same_tokenizer(tokenizer, Tokenizer(Path(model)), f"draft model {model}")
            runner = ModelRunner(model, device=device, dtype=dtype, num_pages=num_pages,
                                 page_size=page_size, attention="auto",
                                 cuda_graphs=torch.device(device).type == "cuda")
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, runner.tokenizer,
                                 f"draft model {runner.loaded.path}")
        self.runner = runner
        self.pool = BlockPool(runner.allocatable_pages, runner.page_size)
        self.tree = KVTree(self.pool)
        self.vocab_size = vocab_size or runner.vocab_size
        self._roots: dict[Hashable, int] = {}
        self._rows: list[Hashable] = []
        self._contexts: Sequence[Sequence[int]] = ()
        self._nodes: dict[tuple[int, int], int] = {}  # (row, tree node) -> draft KV node
        self._transient: list[int] = []
        self._failed = False
        self.stats = {"draft_forwards": 0, "draft_tokens": 0, "draft_resets": 0}

    # -- per-branch roots ---------------------------------------------------------
    def forget(self, key: Hashable) -> None:
        """Release the draft KV of branch `key`."""
        node = self._roots.pop(key, None)
        if node is not None:
            self.tree.release(node)

    def reset(self) -> None:
        """Release every draft KV root (the pool ran short)."""
        for key in list(self._roots):
            self.forget(key)
        self.stats["draft_resets"] += 1

    def begin(self, keys: Sequence[Hashable], contexts: Sequence[Sequence[int]]) -> None:
        """The step's branches; their draft KV roots are synced on first expansion."""
        self._rows, self._contexts = list(keys), contexts
        self._nodes, self._transient, self._failed = {}, [], False

    def end(self) -> None:
        """Release the step's draft forks (the roots stay)."""
        for node in self._transient:
            self.tree.release(node)
        self._nodes, self._transient, self._contexts = {}, [], ()

    def _root_row(self, r: int) -> tuple[int, list[int]]:
        """Branch r's draft root, cut back to what still matches its context, and
        the context tokens it still has to run (at least the last one)."""
        key, ctx = self._rows[r], list(self._contexts[r])
        node = self._roots.get(key)
        if node is None:
            node = self._roots[key] = self.tree.new_sequence()
            have = 0
        else:
            cached = self.tree.tokens(node)
            m = min(len(cached), len(ctx) - 1)
            neq = np.nonzero(cached[:m] != np.asarray(ctx[:m], dtype=cached.dtype))[0]
            have = int(neq[0]) if len(neq) else m
            if have < len(cached):
                self.tree.truncate(node, have)
        return node, ctx[have:]

    # -- expansion ------------------------------------------------------------------
    def expand(self, requests: Sequence[Expansion]) -> list[list[tuple[int, float]]]:
        """One batched draft forward: the k likeliest next tokens of every request."""
        if self._failed or not requests:
            return [[] for _ in requests]
        # Children of one parent expanded in this call: a lone child continues
        # its parent's KV node (never expanded again), several fork it.
        by_parent: dict[tuple[int, int], list[Expansion]] = {}
        for req in requests:
            if req.node >= 0:
                by_parent.setdefault((req.row, req.parent), []).append(req)
        rows: list[tuple[int, list[int]]] = []
        keys: list[tuple[int, int]] = []
        try:
            for req in requests:
                if req.node < 0:
                    node, toks = self._root_row(req.row)
                else:
                    parent = req.parent
                    pnode = self._nodes[(req.row, parent)] if parent >= 0 else \
                        self._roots[self._rows[req.row]]
                    sibs = by_parent[(req.row, parent)]
                    if len(sibs) == 1 and parent >= 0:
                        node = pnode
                    else:
                        node = self.tree.fork_one(pnode)
                        self._transient.append(node)
                    toks = [req.path[-1]]
                rows.append((node, toks))
                keys.append((req.row, req.node))
            logits = self._forward(rows)
        except OutOfPages:
            log.warning("speculative: the draft model's KV pool is full; its branches restart")
            self._failed = True
            for node in self._transient:
                self.tree.release(node)
            self._transient = []
            self.reset()
            return [[] for _ in requests]
        for key, (node, _) in zip(keys, rows):
            self._nodes[key] = node
        if self.temperature > 0:
            return self._sampled(requests, logits)
        probs = torch.softmax(logits.float(), dim=-1)[:, :self.vocab_size]
        k = max(r.k for r in requests)
        vals, ids = host_copies(*probs.topk(min(k, probs.shape[1]), dim=-1))
        vals, ids = vals.tolist(), ids.tolist()
        return [list(zip(ids[i][:r.k], vals[i][:r.k])) for i, r in enumerate(requests)]

    def _sampled(self, requests: Sequence[Expansion], logits: torch.Tensor) -> list[Sampled]:
        """k independent draws per request from softmax(logits / temperature), in
        the order drawn (a value-sorted order would not be draws from q any
        more), each with that distribution for verification. The draws are
        seeded by the request's context and path: a branch's run is
        reproducible given its own seed."""
        q = torch.softmax(logits.float()[:, :self.vocab_size] / self.temperature, dim=-1)
        # Inverse-CDF draws with counter-based uniforms, all requests at once: a
        # seeded torch.multinomial per request cost a generator and a few kernel
        # launches each, and a device read each for the tokens.
        ks = [r.k for r in requests]
        u = uniforms_many([self._draw_key(req) for req in requests], [0] * len(ks), ks)
        dev = q.device
        rows = to_device(np.repeat(np.arange(len(requests)), ks), dev)
        cdf = torch.cumsum(q.double(), dim=-1)[rows]
        x = to_device(u.astype(np.float64), dev)[:, None] * cdf[:, -1:]
        # (The first token whose cumulative mass exceeds x: its own mass is > 0.)
        ids = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_max(q.shape[1] - 1)
        # Every request's draws and their probabilities in one host transfer.
        ids_h, probs_h = host_copies(ids, q[rows, ids])
        ids_h, probs_h = ids_h.tolist(), probs_h.tolist()
        out, at = [], 0
        for i, n in enumerate(ks):
            out.append(Sampled(list(zip(ids_h[at:at + n], probs_h[at:at + n])), q[i]))
            at += n
        return out

    def _draw_key(self, req: Expansion) -> int:
        """The draws' seed: the request's context (its tail and length) and path."""
        ctx = self._contexts[req.row]
        return hash((tuple(ctx[-16:]), len(ctx), req.path)) & ((1 << 63) - 1)

    def _forward(self, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Append each row's tokens and run them; logits at each row's last token.

        Rows of a few tokens (every step after a branch's first) run
        decode-shaped, one row per token, so a CUDA-graph runner replays
        them; a long first prefill runs as an ordinary prefill step."""
        nodes = np.asarray([n for n, _ in rows], dtype=np.int64)
        counts = np.asarray([len(t) for _, t in rows], dtype=np.int32)
        flat = np.asarray([t for _, ts in rows for t in ts], dtype=np.int32)
        last = np.cumsum(counts) - 1
        if counts.max() <= DECODE_SHAPED_MAX:
            plan = decode_shaped_plan(self.tree, nodes, counts, flat, self.runner.page_size)
            plan = replace(plan, sample_rows=last.astype(np.int64)) \
                if self.runner.graphs is None else plan
        else:
            starts = np.asarray([self.tree.num_tokens(n) for n in nodes], dtype=np.int64)
            appended = self.tree.append_batch(nodes, counts, flat)
            indptr, indices, last_len = self.tree.export_csr(nodes)
            qo = np.zeros(len(rows) + 1, dtype=np.int32)
            np.cumsum(counts, out=qo[1:])
            positions = np.repeat(starts - qo[:-1], counts) + np.arange(len(flat))
            plan = StepPlan(input_ids=flat, positions=positions,
                            slot_mapping=appended.slot_mapping, qo_indptr=qo, kv_indptr=indptr,
                            kv_indices=indices, kv_last_page_len=last_len,
                            copies=appended.copies,
                            sample_rows=np.arange(len(rows), dtype=np.int64))
            last = None
        self.stats["draft_forwards"] += 1
        self.stats["draft_tokens"] += int(counts.sum())
        logits = self.runner.execute(plan)
        if last is not None and len(plan.sample_rows) != len(rows):
            logits = logits[torch.as_tensor(last, device=logits.device)]
        return logits

    def close(self) -> None:
        """Release every draft KV root."""
        for key in list(self._roots):
            self.forget(key)

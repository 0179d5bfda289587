"""`Speculator`: the engine's speculative decode step (draft, verify in one forward, commit).

`Engine.step()` asks `try_step()` first; None means "not this step" and the
engine runs its usual step. A speculative step runs when every runnable leaf
is a decoding branch (one pending token, a live request, nothing owed) and
the on/off rule of `SpeculativeConfig` says so. Then, for every branch of
the batch, in one step:

1. Draft: the drafter proposes a `DraftTree` after the branch's tokens (at
   most `max_tokens - generated - 1` deep); a grammar-constrained branch
   drops the nodes its grammar forbids (`prune_by_grammar`).
2. Verify in one forward. A chain (one path) is appended to the branch's own
   KV node: [last token, d1..dk]. A tree with several paths forks the
   branch's node once per root-to-leaf path (O(1), pages shared by
   reference) and appends [last token, its path] to each fork: shared draft
   prefixes are recomputed per path, and no custom mask is needed. Every new
   token runs as a decode row of its own over its pages up to itself
   (dendrite/speculative/plan.py), so the step is decode-shaped and a CUDA
   runner replays it as a graph. Logits come back at every position.
3. Accept (dendrite/speculative/verify.py): the engine's sampler draws the
   target token at every tree node, with the branch's seed and the node's
   absolute position, its penalties and its grammar mask; the walk follows
   the drawn tokens down the tree. This is the point-mass case of recursive
   rejection sampling, so it is exact; and since the draws are the ones a
   plain step would make, the tokens are those of a non-speculative run.
   Drafts drawn from a draft distribution (a sampling branch without a
   grammar) are verified by recursive rejection sampling instead: exact in
   distribution, seeded, not the plain run's tokens. The host reads the
   device once for all of it: the draws, their logprobs and the
   distributions the rejection tests need come over in one queued transfer,
   and the walks run on the host copies.
4. Commit: the other forks are released at once (their pages go back to the
   pool in this step), the accepted path's tokens are appended to the
   branch's own node with their K/V copied from its fork (which is then
   released too), the KV is cut after the last accepted draft token, and the
   accepted tokens go through the engine's own bookkeeping (stop strings,
   EOS, grammar, forced tokens, max_tokens) exactly as if sampled one per
   step: the first that ends the request or makes the grammar force tokens
   is handed to the engine from the state a plain step would have had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from dendrite.speculative.costs import StepCosts
from dendrite.speculative.plan import decode_shaped_plan
from dendrite.speculative.tree import DraftTree
from dendrite.speculative.verify import (
    prune_by_grammar,
    recursive_rejection_sample,
    seeded_uniforms,
)
from dendrite.transfer import to_device

if TYPE_CHECKING:
    from dendrite.engine import Engine, GenHandle, Sequence, _Launched

__all__ = ["SPEC_STATS", "Speculator"]

#: Plain steps a branch takes after its drafter had nothing for it.
EMPTY_DRAFT_SKIP = 2

#: Plain steps in batches of at most `max_rows` branches after which a branch
#: marked wide (it ran in a wider step) may speculate again: longer than the
#: ragged tail of a wide run, where branches finish a few steps apart; a
#: request that outlives a burst of others drafts again after it.
WIDE_COOLDOWN = 32

#: The counters a speculator adds to `Engine.stats`.
SPEC_STATS = ("spec_steps", "spec_rows", "spec_drafted", "spec_accepted", "spec_off_steps")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host; from CUDA a queued copy into pinned memory, valid after
    the step's one wait (`SamplerOutput.cpu_async`, queued after it)."""
    return t if t.device.type == "cpu" else t.to("cpu", non_blocking=True)


class _Row:
    """One branch of a speculative step: its draft tree and where its rows went."""

    __slots__ = (
        "cached",
        "first_row",
        "forked",
        "last",
        "nodes",
        "paths",
        "seq",
        "states",
        "stochastic",
        "target",
        "tree",
    )

    def __init__(self, seq: Sequence, tree: DraftTree, states: list | None,
                 paths: list[list[int]] | None = None) -> None:
        self.seq = seq
        self.tree = tree
        self.states = states  # grammar state after each node (constrained only)
        self.paths = (tree.paths() if paths is None else paths) or [[]]
        self.nodes: list[int] = []  # KV node of each path's row
        self.forked = len(self.paths) > 1
        self.cached = seq.num_cached
        self.last = seq.pending[0]
        self.first_row = 0  # index of its first row in the step
        # Drawn drafts of a sampling, unconstrained branch are verified by
        # recursive rejection sampling against the target's distribution;
        # otherwise (proposals, greedy, or a grammar that pruned the draws)
        # by the walk of the target's own draws, exact for any proposal.
        h = seq.handle
        self.stochastic = bool(tree.dists) and not h.params.greedy and h.matcher is None
        # node -> (p, model logprobs, position, q): host copies (see _target_dists)
        self.target: dict[int, tuple] = {}


class Speculator:
    """Drafts, verifies and commits for an engine (see the module docstring)."""

    def __init__(self, engine: Engine, config) -> None:
        # (`config` is a SpeculativeConfig, which imports this module to attach.)
        self.engine = engine
        self.config = config
        self.shape = config.shape
        self.drafter = config.make_drafter(engine)
        self._ema: dict[int, float] = {}  # id(seq) -> recent acceptance length
        self._paused: dict[int, int] = {}  # id(seq) -> plain steps since it stopped drafting
        self._skip: dict[int, int] = {}  # id(seq) -> plain steps left before drafting again
        self._keys: set[int] = set()  # branches the drafter has seen
        # Branches that ran in a step of more than max_rows branches: they do not
        # speculate until WIDE_COOLDOWN narrow plain steps later. id(seq) ->
        # [seq, narrow steps since] (a strong reference: the id is not reused).
        self._wide: dict[int, list] = {}
        # The break-even acceptance length: the config's number, else on CUDA
        # measured per batch width as the engine runs (`StepCosts`; the device
        # default until both kinds of step are timed), else the device default.
        fallback = config.break_even_for(engine.device.type)
        self.costs = StepCosts(fallback) if config.break_even is None \
            and engine.device.type == "cuda" else None
        self.break_even = fallback
        # The verify budget: tokens of one speculative step. Default: the
        # largest decode step the runner replays as a CUDA graph (beyond it
        # the step runs eagerly, slower than the graph decode it replaces),
        # else the engine's step budget.
        graphs = getattr(engine.runner, "graphs", None)
        auto = graphs.max_batch_size if graphs is not None else engine.max_batch_tokens
        self.max_verify = min(config.max_verify_tokens or auto, engine.max_batch_tokens)
        for k in SPEC_STATS:
            engine.stats.setdefault(k, 0)
        engine.stats.setdefault("spec_mean_accept_len", 0.0)
        engine.stats.setdefault("spec_break_even", self.break_even)

    # -- the rule ---------------------------------------------------------------------
    def close(self) -> None:
        """Release the drafter's KV (a draft model's roots) and, for a drafter
        this config built, the drafter itself: its weights go with the engine."""
        close = getattr(self.drafter, "close", None)
        if close is not None:
            close()
        self._keys.clear()
        if self.config.drafter is None:
            self.drafter = None

    def _decode_rows(self) -> list[Sequence] | None:
        """The runnable leaves if all are plain decoding branches, else None."""
        runnable = self.engine._runnable()
        if not runnable:
            return None
        for s in runnable:
            h = s.handle
            if (h is None or h.done or h.finishing is not None or h.owed
                    or len(s.pending) != 1):
                return None
        return runnable

    def _mark_wide(self, seqs: Seq[Sequence]) -> None:
        """Remember the branches of a step wider than `max_rows`.

        Without this, the rule let the tail of a wide run speculate: once
        branches finish, the last `max_rows` or fewer pass the row count, and
        every one of them drafts (a branch without an acceptance history is
        probed). On the H100 a 16-branch n-gram run took 16 such steps and
        ran at 0.84x of plain: the tail's steps lose launch-ahead to the
        drafting and verify steps, and few of its tokens are left to win.
        A marked branch speculates again after `WIDE_COOLDOWN` plain steps in
        narrow batches (`_plain_step`)."""
        if len(self._wide) > 2 * len(self.engine._live) + 64:  # drop finished branches
            live = {id(s) for s in self.engine._live.values()}
            self._wide = {k: w for k, w in self._wide.items() if k in live}
        for s in seqs:
            self._wide[id(s)] = [s, 0]

    def _set_width(self, width: int) -> None:
        """The break-even for a step of `width` decoding branches (`StepCosts`)."""
        if self.costs is not None:
            self.break_even = self.costs.break_even(width)
            self.engine.stats["spec_break_even"] = self.break_even

    def note_plain_step(self, launched: _Launched) -> None:
        """The engine ended a plain step (`_Launched`): its time counts as a plain
        decode step of its width, or as no step at all (a prefill, a scoring step)."""
        if self.costs is None:
            return
        if launched.decode and len(launched.seqs) <= self.config.max_rows:
            self.costs.note("plain", len(launched.seqs))
        else:
            self.costs.skip()

    def _wants(self, s: Sequence) -> bool:
        if self._skip.get(id(s), 0) > 0 or id(s) in self._wide:
            return False
        ema = self._ema.get(id(s))
        if ema is None or ema >= self.break_even:
            return True
        return self._paused.get(id(s), 0) >= self.config.probe_every

    def _note_accept(self, s: Sequence, length: float) -> None:
        """Fold a step's acceptance length into the branch's running average."""
        a = self.config.ema
        old = self._ema.get(id(s), length)
        self._ema[id(s)] = (1 - a) * old + a * length

    def would_speculate(self, seqs: Seq[Sequence]) -> bool:
        """Whether the next step over `seqs` may speculate (the engine then launches
        no step ahead)."""
        narrow = len(seqs) <= self.config.max_rows
        if not narrow:
            self._mark_wide(seqs)
        else:
            self._set_width(len(seqs))
            if any(self._wants(s) for s in seqs):
                return True
        for s in seqs:  # each takes a plain step now
            self._plain_step(s, narrow)
        return False

    def _plain_step(self, s: Sequence, narrow: bool) -> None:
        """Count a plain step of a branch that is pausing, skipping or marked wide
        (`narrow`: the step has at most `max_rows` branches)."""
        key = id(s)
        w = self._wide.get(key)
        if w is not None and narrow:
            w[1] += 1
            if w[1] >= WIDE_COOLDOWN:
                del self._wide[key]
        if key in self._ema:
            self._paused[key] = self._paused.get(key, 0) + 1
        if self._skip.get(key, 0) > 0:
            self._skip[key] -= 1

    def _forget_gone(self) -> None:
        live = {id(s) for s in self.engine._live.values()}
        for key in self._keys - live:
            self.drafter.forget(key)
            self._ema.pop(key, None)
            self._paused.pop(key, None)
            self._skip.pop(key, None)
        self._keys &= live
        self._wide = {k: w for k, w in self._wide.items() if k in live}

    # -- the step ----------------------------------------------------------------------
    def try_step(self) -> list[GenHandle] | None:
        """One speculative step, or None when this step should be a plain one."""
        e = self.engine
        seqs = self._decode_rows()
        if seqs is None:
            return None
        stats = e.stats
        if len(seqs) > self.config.max_rows:
            self._mark_wide(seqs)
            stats["spec_off_steps"] += 1
            return None
        want = []
        self._set_width(len(seqs))
        for s in seqs:
            if self._wants(s):
                want.append(s)
            else:
                self._plain_step(s, narrow=True)
        if not want:
            stats["spec_off_steps"] += 1
            return None
        # Verify tokens per drafting branch, so that the step stays within the
        # verify budget (a CUDA-graph-sized decode step by default).
        per_row = (self.max_verify - (len(seqs) - len(want))) // len(want)
        if per_row < 2:
            stats["spec_off_steps"] += 1
            return None
        # Matchers are advanced below: no mask prefetch may be computing or kept.
        e._settle_masks()
        if e._mask_worker is not None:
            e._mask_worker.prefetch([])
        self._forget_gone()
        trees = self._draft(want, per_row)
        for s in want:
            if not len(trees[id(s)]):
                # Nothing to draft (no n-gram match): the branch skips drafting
                # for a few plain steps, which the engine may launch ahead.
                self._skip[id(s)] = EMPTY_DRAFT_SKIP
        if not any(len(t) for t in trees.values()):
            if self.costs is not None:
                self.costs.skip()  # the drafting is not a plain step's cost
            return None
        rows = []
        for s in seqs:
            tree = trees.get(id(s))
            if tree is None or not len(tree):
                rows.append(_Row(s, DraftTree(), None, []))
                continue
            paths = tree.paths()  # (once: verify_tokens and _Row would each walk the tree)
            if sum(1 + len(p) for p in paths) > per_row:
                tree = tree.trim(per_row)
                paths = None
            states = None
            if s.handle.matcher is not None and len(tree):
                tree, states = prune_by_grammar(tree, s.handle.matcher)
                paths = None
            rows.append(_Row(s, tree, states, paths))
        for s in want:
            self._paused.pop(id(s), None)
        finished = self._run(rows)
        if self.costs is not None:
            if finished is None:
                self.costs.skip()  # drafted, then fell back to the plain step
            else:
                self.costs.note("spec", len(seqs))
        return finished

    def _draft(self, want: list[Sequence], per_row: int) -> dict[int, DraftTree]:
        # Fit `per_row` verify tokens: a static tree's paths each run depth + 1
        # tokens (fewer, deeper paths first); a dynamic one is trimmed after.
        shape = self.shape
        if shape.kind == "static":
            shape = replace(shape, width=max(1, min(shape.width, per_row // 2)))
            fit = per_row // shape.width - 1
        else:
            fit = per_row - 1
        depths = [max(0, min(self.config.num_draft, fit,
                             s.handle.params.max_tokens - len(s.handle.token_ids) - 1))
                  for s in want]
        keys = [id(s) for s in want]
        self._keys.update(keys)
        trees = self.drafter.propose(keys, [s.tokens for s in want], shape, depths)
        self._check_trees(trees, len(want))
        return {k: t for k, t in zip(keys, trees)}

    def _check_trees(self, trees: object, n: int) -> None:
        """A drafter's output, checked before anything is forked or appended."""
        who = type(self.drafter).__name__
        if not isinstance(trees, list) or len(trees) != n or \
                not all(isinstance(t, DraftTree) for t in trees):
            raise TypeError(f"speculative: drafter {who} must return a list of {n} DraftTree")
        vocab = self.engine.runner.vocab_size
        for t in trees:
            for tok in t.tokens:
                if not 0 <= tok < vocab:
                    raise ValueError(f"speculative: drafter {who} proposed token id {tok}, "
                                     f"outside the vocabulary [0, {vocab})")

    def _pages_needed(self, rows: list[_Row]) -> int:
        e = self.engine
        ps = e.page_size
        need = 0
        chains = [(r.seq.node, 1 + len(r.paths[0])) for r in rows if not r.forked]
        if chains:
            need += e.tree.pages_needed(np.asarray([n for n, _ in chains], dtype=np.int64),
                                        np.asarray([c for _, c in chains], dtype=np.int32))
        for r in rows:
            if r.forked:  # a fork's first write copies the parent's partly filled page
                need += sum(-(-(r.cached % ps + 1 + len(p)) // ps) for p in r.paths)
        return need

    def _run(self, rows: list[_Row]) -> list[GenHandle] | None:
        e = self.engine
        total = sum(1 + len(p) for r in rows for p in r.paths)
        if total > e.max_batch_tokens:
            return None
        need = self._pages_needed(rows)
        if need > e.pool.free and e.cache is not None:
            e.cache.evict(need - e.pool.free)
        if need > e.pool.free:
            return None  # the plain step preempts; speculation never does
        nodes: list[int] = []
        counts: list[int] = []
        flat: list[int] = []
        try:
            for r in rows:
                r.first_row = len(nodes)
                r.nodes = [int(n) for n in e.tree.fork(r.seq.node, len(r.paths))] \
                    if r.forked else [r.seq.node]
                for node, path in zip(r.nodes, r.paths):
                    toks = [r.last] + [r.tree.tokens[i] for i in path]
                    nodes.append(node)
                    counts.append(len(toks))
                    flat.extend(toks)
            logits, qo = self._forward(rows, nodes, counts, flat)
            out = self._sample(rows, logits, qo)
        except BaseException:
            self._rollback(rows)
            raise
        return self._commit(rows, out)

    def _forward(self, rows: list[_Row], nodes: list[int], counts: list[int], flat: list[int]
                 ) -> tuple[torch.Tensor, np.ndarray]:
        """Append every row's tokens and run them, each token a decode row of its
        own (`decode_shaped_plan`); logits at every new token, in token order.
        Returns them and each row group's first token index."""
        e = self.engine
        plan = decode_shaped_plan(e.tree, np.asarray(nodes), np.asarray(counts),
                                  np.asarray(flat), e.page_size)
        for r in rows:
            r.seq.pending = []
        logits = e.runner.execute(plan)
        e.stats["steps"] += 1
        e.stats["forward_tokens"] += len(flat)
        first = np.zeros(len(nodes) + 1, dtype=np.int64)
        np.cumsum(counts, out=first[1:])
        return logits, first

    def _sample(self, rows: list[_Row], logits: torch.Tensor, qo: np.ndarray):
        """The target's draw at every tree node (root included), in one sampler call.

        Everything the acceptance reads on the host (the draws, their
        logprobs, and for rejection-sampled branches the target and draft
        distributions) comes back in one device->host transfer: the copies
        are queued and waited for once (`SamplerOutput.cpu_async`), and the
        gather index goes up asynchronously (`to_device`), so the host never
        waits for the forward before the sampler is queued.

        Returns per row a dict node -> (token, logprob, top alternatives or None)."""
        e = self.engine
        index: list[int] = []
        params, positions, history, matchers = [], [], [], []
        owners: list[tuple[int, int]] = []
        need_history = any(r.seq.handle.params.repetition_penalty != 1.0 for r in rows)
        for k, r in enumerate(rows):
            h = r.seq.handle
            base = int(qo[r.first_row])
            if not r.forked:
                # A chain (or no draft): node d - 1 is at offset d of its one row.
                n = len(r.tree) + 1
                nodes = range(-1, n - 1)
                index.extend(range(base, base + n))
                positions.extend(range(r.cached + 1, r.cached + 1 + n))
            else:
                where = {-1: (0, 0)}  # node -> (path index, offset in its row)
                for pi, path in enumerate(r.paths):
                    for d, node in enumerate(path, 1):
                        where.setdefault(node, (pi, d))
                nodes = sorted(where)
                for node in nodes:
                    pi, d = where[node]
                    index.append(int(qo[r.first_row + pi]) + d)
                    positions.append(r.cached + 1 + d)
            params.extend([h.params] * len(nodes))
            if need_history:
                ctx = e.tree.tokens(r.nodes[0])[:r.cached + 1].tolist()
                history.extend(ctx + r.tree.path_tokens(node) for node in nodes)
            if h.matcher is not None:
                matchers.extend((len(owners) + i, h.matcher if node < 0 else r.states[node])
                                for i, node in enumerate(nodes))
            owners.extend((k, node) for node in nodes)
        allowed = None
        if matchers:
            from dendrite.grammar.masks import fill_masks

            allowed = matchers[0][1].tokenizer.allocate_bitmask(len(owners), pin_memory=False)
            fill_masks([m for _, m in matchers], allowed, [i for i, _ in matchers])
        if index == list(range(logits.shape[0])):
            idx, picked = None, logits  # every row is a node (all chains): no gather
        else:
            idx = to_device(np.asarray(index, dtype=np.int64), logits.device)
            picked = logits[idx]
        out = e.sampler(picked, params, positions,
                        prev_tokens=history if need_history else None, allowed=allowed)
        # (Queued before the sampler's copies: its one wait covers them too.)
        self._target_dists(rows, picked, owners, positions, history if need_history else None)
        out = out.cpu_async()()
        toks, lps = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        drawn: list[dict[int, tuple]] = [{} for _ in rows]
        for j, (k, node) in enumerate(owners):
            n = rows[k].seq.handle.params.logprobs
            top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n > 0 else None
            drawn[k][node] = (toks[j], lps[j], top)
        return drawn

    def _target_dists(self, rows: list[_Row], picked: torch.Tensor,
                      owners: list[tuple[int, int]], positions: list[int],
                      history: list | None) -> None:
        """For the branches verified by rejection sampling (drawn drafts, see
        `_Row.stochastic`): the target's distribution p at each node whose
        children were drawn, processed as the sampler processes a row
        (penalty, temperature, top-k/p, min-p), the model's logprobs there,
        and the draft distribution q, each queued for a host copy (the
        rejection walk runs on the host: one transfer, not a read per test)."""
        from dendrite.sampling import _apply_repetition_penalty, _filter

        sel = [j for j, (k, node) in enumerate(owners)
               if rows[k].stochastic and node in rows[k].tree.dists]
        if not sel:
            return
        dev = picked.device
        raw = picked[to_device(np.asarray(sel, dtype=np.int64), dev)].float()
        logp = torch.log_softmax(raw, dim=-1)
        params = [rows[owners[j][0]].seq.handle.params for j in sel]
        x = raw
        if history is not None:
            x = _apply_repetition_penalty(x, params, [history[j] for j in sel])
        temps = to_device(np.asarray([p.temperature for p in params], dtype=np.float32), dev)
        p = torch.softmax(_filter(x / temps[:, None], params), dim=-1)
        host = _to_host(torch.stack([p, logp]))
        for i, j in enumerate(sel):
            k, node = owners[j]
            q = rows[k].tree.dists[node]
            rows[k].target[node] = (host[0, i], host[1, i], positions[j], _to_host(q))

    def _rollback(self, rows: list[_Row]) -> None:
        """Undo a step that failed before its commit: forks released, KV cut back,
        the last token pending again."""
        e = self.engine
        for r in rows:
            if r.forked:
                for node in r.nodes:
                    e.tree.release(node)
            elif e.tree.num_tokens(r.seq.node) > r.cached:
                e.tree.truncate(r.seq.node, r.cached)
            r.seq.pending = [r.last]
            r.nodes = []

    def _commit(self, rows: list[_Row], drawn: list[dict[int, tuple]]) -> list[GenHandle]:
        e = self.engine
        stats = e.stats
        finished: list[GenHandle] = []
        stats["spec_steps"] += 1
        for r, dr in zip(rows, drawn):
            seq, h = r.seq, r.seq.handle
            accepted, final = self._walk(r, dr)
            j = len(accepted)
            if len(r.tree):
                stats["spec_rows"] += 1
                stats["spec_drafted"] += len(r.tree)
                stats["spec_accepted"] += j
                self._note_accept(seq, j + 1.0)
            # The row that holds the accepted path becomes the branch.
            pick = 0
            if j:
                pick = next(i for i, p in enumerate(r.paths) if p[:j] == accepted)
            if seq.waited >= e.max_wait_steps:
                e.scheduler.set_priority(seq.node, seq.priority)
            seq.waited = 0
            if r.forked:
                self._adopt(r, pick, j)
            else:
                e.tree.truncate(seq.node, r.cached + 1 + j)
            # Each accepted draft token with the model's logprob at its parent,
            # then the token drawn after the last of them.
            emitted = []
            for parent, child in zip([-1, *accepted], accepted):
                tok = r.tree.tokens[child]
                if dr[parent][0] == tok:
                    emitted.append(dr[parent])
                else:  # accepted by rejection sampling: not the sampler's draw
                    emitted.append((tok, float(r.target[parent][1][tok]), dr[parent][2]))
            emitted.append(final)
            if self._accept_all(r, h, emitted, j):
                finished.append(h)
        rows_spec = stats["spec_rows"]
        if rows_spec:
            stats["spec_mean_accept_len"] = (stats["spec_accepted"] + rows_spec) / rows_spec
        return finished

    def _walk(self, r: _Row, dr: dict[int, tuple]) -> tuple[list[int], tuple]:
        """The accepted draft nodes, root first, and the (token, logprob, top)
        emitted after them.

        At a node whose children are proposals, the target's own draw there
        (`dr`) picks the child (`verify.walk`); at a node whose children were
        drawn from a draft distribution q (a stochastic branch), SpecInfer's
        recursive rejection sampling decides, with uniforms keyed by the
        branch's seed and the node's position."""
        tree, node, accepted = r.tree, -1, []
        while True:
            kids = tree.children(node) if r.stochastic and node in tree.dists else None
            if kids:
                # (All on the host copies: no device read per test.)
                p, logp, pos, q = r.target[node]
                seed = r.seq.handle.params.seed
                if seed is None:
                    seed = self.engine.sampler._rng.getrandbits(64)
                u = seeded_uniforms(seed, pos, len(kids) + 1)
                i, tok = recursive_rejection_sample(p, [tree.tokens[c] for c in kids],
                                                    [q] * len(kids), u)
                if i >= 0:
                    accepted.append(kids[i])
                    node = kids[i]
                    continue
                return accepted, (tok, float(logp[tok]), dr[node][2])
            tok = dr[node][0]
            child = tree.child_with_token(node, tok)
            if child is None:
                return accepted, dr[node]
            accepted.append(child)
            node = child

    def _adopt(self, r: _Row, pick: int, j: int) -> None:
        """Make the accepted path's fork the branch's KV; release the other forks now.

        Where the runner's KV pool can copy pages, the accepted tokens are
        appended to the branch's own node and their K/V copied over from the
        fork, which is then released: the branch keeps one node, and the
        partly filled page the fork had copied does not stay behind (moving
        the branch onto the fork instead would strand one such page per step).
        Otherwise, or when the pool is too short for the copy, the branch
        moves onto the fork (as `Engine._thaw` does)."""
        e, seq, ps = self.engine, r.seq, self.engine.page_size
        child = r.nodes[pick]
        e.tree.truncate(child, r.cached + 1 + j)
        for i, node in enumerate(r.nodes):
            if i != pick:
                e.tree.release(node)  # their pages go back now
        kv = getattr(e.runner, "kv_cache", None)
        if kv is not None and e.pool.free >= -(-(r.cached % ps + 1 + j) // ps):
            first = r.cached // ps
            own = e.tree.pages(child)[first:].copy()
            new_tokens = e.tree.tokens(child)[r.cached:].copy()
            for page in own:  # held while the fork goes, so no append reuses them
                e.pool.incref(int(page))
            try:
                e.tree.release(child)
                appended = e.tree.append(seq.node, new_tokens)
                if len(appended.copies):
                    kv.copy_pages(appended.copies)
                dst = e.tree.pages(seq.node)[first:]
                kv.copy_pages(np.stack([own, dst, np.full(len(own), ps, dtype=own.dtype)], 1))
            finally:
                for page in own:
                    e.pool.decref(int(page))
            return
        old = seq.node
        e._untrack(seq)
        seq.node = child
        e.tree.release(old)  # kept alive by the branch's new node
        e._track(seq)

    def _accept_all(self, r: _Row, h: GenHandle, emitted: list[tuple], j: int) -> bool:
        """Hand the accepted tokens to the engine as a plain step would have.

        `emitted[:j]` are accepted draft tokens (their KV is already in the
        branch), `emitted[j]` the token drawn after them. A draft token that
        neither ends the request nor makes the grammar force tokens is only
        recorded; the first one that does, and the last token, go through
        `Engine._accept` with the KV cut to just before them. Returns whether
        the request finished."""
        e, seq = self.engine, r.seq
        for i, (tok, lp, top) in enumerate(emitted):
            if math.isnan(lp):
                e.tree.truncate(seq.node, r.cached + 1 + i)
                e._reject_row(h, e.stats["steps"], placeholders=False)
                return True
            if i < j and self._record_if_plain(h, tok, lp, top):
                continue
            e.tree.truncate(seq.node, r.cached + 1 + i)
            return e._accept(h, tok, lp, top)
        return False

    @staticmethod
    def _record_if_plain(h: GenHandle, tok: int, lp: float, top) -> bool:
        """Record a draft token if the request simply goes on after it; otherwise
        leave everything as it was and return False."""
        h.token_ids.append(tok)
        h.logprobs.append(lp)
        if top is not None:
            h.top_logprobs.append(top)
        m = h.matcher
        if m is not None:
            m.consume(tok)
        plain = (h.stop.check(h.token_ids) is None
                 and len(h.token_ids) < h.params.max_tokens
                 and (m is None or (not m.is_stopped() and not m.forced_tokens())))
        if plain:
            return True
        h.token_ids.pop()
        h.logprobs.pop()
        if top is not None:
            h.top_logprobs.pop()
        if m is not None:
            m.rollback(1)
        h.stop.matched = None
        return False

"""A minimal page allocator for the model tests (the engine uses the native KV tree).

Mirrors the native core's contract closely enough to drive the model runner:
pages hold `page_size` tokens, a fork shares every page of the parent, and the
first append of a child into a shared, partially filled last page allocates a
fresh page and emits a copy-on-write row `(src, dst, num_tokens)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Seq:
    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0
    shared_last: bool = False  # last page is shared with a sibling/parent: copy before writing
    tokens: list[int] = field(default_factory=list)


@dataclass
class Step:
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    copies: np.ndarray


class Pager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.free = list(range(num_pages - 1, -1, -1))
        self.seqs: dict[int, Seq] = {}
        self._next = 0

    def new(self) -> int:
        sid, self._next = self._next, self._next + 1
        self.seqs[sid] = Seq()
        return sid

    def fork(self, sid: int, n: int) -> list[int]:
        """O(pages) test fork: children share the parent's pages (no copy yet)."""
        parent = self.seqs[sid]
        kids = []
        for _ in range(n):
            k = self.new()
            self.seqs[k] = Seq(
                list(parent.pages),
                parent.num_tokens,
                parent.num_tokens % self.page_size != 0,
                list(parent.tokens),
            )
            kids.append(k)
        return kids

    def _append(self, sid: int, tokens: list[int], copies: list[tuple[int, int, int]]) -> list[int]:
        s, ps = self.seqs[sid], self.page_size
        if tokens and s.shared_last:
            dst = self.free.pop()
            copies.append((s.pages[-1], dst, s.num_tokens % ps))
            s.pages[-1] = dst
            s.shared_last = False
        slots = []
        for t in tokens:
            off = s.num_tokens % ps
            if off == 0:
                s.pages.append(self.free.pop())
            slots.append(s.pages[-1] * ps + off)
            s.num_tokens += 1
            s.tokens.append(t)
        return slots

    def step(self, batch: list[tuple[int, list[int]]]) -> Step:
        """Append each (seq, new tokens) and return the step's runner inputs."""
        copies: list[tuple[int, int, int]] = []
        ids, pos, slots, qo, kvp, kvi, last = [], [], [], [0], [0], [], []
        for sid, toks in batch:
            start = self.seqs[sid].num_tokens
            slots += self._append(sid, list(toks), copies)
            s = self.seqs[sid]
            ids += list(toks)
            pos += list(range(start, s.num_tokens))
            qo.append(len(ids))
            kvi += s.pages
            kvp.append(len(kvi))
            last.append(s.num_tokens - (len(s.pages) - 1) * self.page_size)
        i32 = lambda a: np.asarray(a, dtype=np.int32)
        return Step(
            np.asarray(ids, np.int64),
            np.asarray(pos, np.int64),
            np.asarray(slots, np.int64),
            i32(qo),
            i32(kvp),
            i32(kvi),
            i32(last),
            np.asarray(copies, np.int32).reshape(-1, 3),
        )


def run_step(runner, pager: Pager, batch: list[tuple[int, list[int]]], with_step: bool = False):
    """One runner step over `batch`: float32 logits, one row per sequence
    (and the `Step` it ran, with its copy-on-write rows, if `with_step`)."""
    st = pager.step(batch)
    meta = runner.build_metadata(
        st.positions,
        st.slot_mapping,
        st.qo_indptr,
        st.kv_indptr,
        st.kv_indices,
        st.kv_last_page_len,
    )
    logits = runner.run(st.input_ids, meta, copies=st.copies)
    return (logits, st) if with_step else logits

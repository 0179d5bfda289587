"""Hypothesis state machine over fork/append/truncate/release/match/insert/evict.

After every step: `check_invariants` (refcounts == references, free list ==
zero-ref pages, no cycles, valid pages) and every live sequence reads back
its own simulated K/V through its pages. At teardown, releasing everything
must leave zero pages used.
"""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dendrite.kv import BlockPool, FrozenNode, KVTree, OutOfPages, RadixCache, check_invariants
from kv_sim import DeviceKV, kv_values

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # tiny vocab: cache hits


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(40, page_size=4, cow_headroom=2)
        self.tree = KVTree(self.pool)
        self.cache = RadixCache(self.pool)
        self.dev = DeviceKV(self.pool)
        self.owned: list[int] = []  # handles we still hold
        self.pins: list[np.ndarray] = []  # outstanding pinned matches
        self.inserted: list[list[int]] = []  # token lists given to cache.insert
        self.now = 0.0

    def pick(self, data, pool=None):
        pool = self.owned if pool is None else pool
        return data.draw(st.sampled_from(pool))

    def prune(self):
        self.owned = [h for h in self.owned
                      if self.tree.is_valid(h) and not self.tree.is_released(h)]

    @rule()
    def new_sequence(self):
        self.owned.append(self.tree.new_sequence())

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        self.owned += self.tree.fork(self.pick(data), n)

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), tokens=TOKENS)
    def append(self, data, tokens):
        node = self.pick(data)
        before, used = self.tree.num_tokens(node), self.pool.used
        try:
            res = self.tree.append(node, tokens)
        except OutOfPages:
            assert self.tree.num_tokens(node) == before and self.pool.used == used
            return
        except FrozenNode:
            assert self.tree.num_children(node) > 0
            return
        self.dev.run_copies(res.copies)
        self.dev.write(self.tree, node, res.slot_mapping)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def append_batch(self, data):
        leaves = [h for h in self.owned if self.tree.num_children(h) == 0]
        if not leaves:
            return
        chosen = data.draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=4, unique=True))
        counts = data.draw(st.lists(st.integers(0, 5), min_size=len(chosen), max_size=len(chosen)))
        tokens = data.draw(st.lists(st.integers(0, 2), min_size=sum(counts), max_size=sum(counts)))
        before = [self.tree.num_tokens(h) for h in chosen]
        try:
            res = self.tree.append_batch(chosen, counts, np.asarray(tokens, dtype=np.int32))
        except OutOfPages:
            assert [self.tree.num_tokens(h) for h in chosen] == before
            return
        self.dev.run_copies(res.copies)
        at = 0
        for h, c in zip(chosen, counts):
            self.dev.write(self.tree, h, res.slot_mapping[at:at + c])
            at += c

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), frac=st.floats(0, 1))
    def truncate(self, data, frac):
        node = self.pick(data)
        if self.tree.num_children(node):
            return
        parent = self.tree.parent(node)
        start = self.tree.num_tokens(parent) if parent >= 0 else 0
        self.tree.truncate(node, start + int(frac * (self.tree.num_tokens(node) - start)))

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def release(self, data):
        self.tree.release(self.pick(data))
        self.prune()

    @precondition(lambda self: self.tree.num_live_nodes)
    @rule(data=st.data())
    def release_subtree(self, data):
        live = [int(h) for h in self.tree.debug_live_nodes()]
        self.tree.release_subtree(self.pick(data, live))
        self.prune()

    @rule(data=st.data(), tail=st.lists(st.integers(0, 2), max_size=9), use=st.booleans())
    def match(self, data, tail, use):
        query = list(tail)
        sources = [self.tree.tokens(h).tolist() for h in self.owned] + self.inserted
        if sources and data.draw(st.booleans()):
            toks = data.draw(st.sampled_from(sources))  # likely a cache hit
            query = toks[:data.draw(st.integers(0, len(toks)))] + query
        n, pages = self.cache.match_prefix(query, now=self.now)
        assert n % 4 == 0 and len(pages) * 4 == n
        if n == 0:
            return
        # Cached pages must still hold exactly the K/V of the matched prefix.
        np.testing.assert_array_equal(self.dev.read(pages, n), kv_values(query[:n]))
        if use:
            self.owned.append(self.tree.new_sequence_from_prefix(pages, n, query[:n]))
        self.pins.append(pages)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        i = data.draw(st.integers(0, len(self.pins) - 1))
        self.cache.unpin(self.pins.pop(i))

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def insert(self, data):
        node = self.pick(data)
        self.now += 1.0
        tokens = self.tree.tokens(node)
        self.cache.insert(tokens, self.tree.pages(node), now=self.now)
        self.inserted.append(tokens.tolist())

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), k=st.integers(1, 6))
    def insert_then_rollback(self, data, k):
        # Cache a sequence, then roll back its last k tokens (speculative
        # decoding): its next write must not land in the now-cached page.
        node = self.pick(data)
        tokens = self.tree.tokens(node)
        self.cache.insert(tokens, self.tree.pages(node), now=self.now)
        self.inserted.append(tokens.tolist())
        if self.tree.num_children(node) == 0:
            parent = self.tree.parent(node)
            start = self.tree.num_tokens(parent) if parent >= 0 else 0
            self.tree.truncate(node, max(start, len(tokens) - k))

    @rule(n=st.integers(1, 8))
    def evict(self, n):
        pinned = self.cache.num_pinned
        self.cache.evict(n)
        assert self.cache.num_pinned == pinned

    @rule(ttl=st.floats(0, 10))
    def evict_expired(self, ttl):
        self.cache.evict_expired(self.now, ttl)

    @invariant()
    def consistent(self):
        check_invariants(self.pool)
        self.dev.check_all(self.tree)
        assert self.cache.num_pinned <= len(self.pins)
        # Whatever is still cached must hold exactly its prefix's K/V.
        for tokens in self.inserted[-8:]:
            n, pages = self.cache.match_prefix(tokens, now=self.now, pin=False)
            np.testing.assert_array_equal(self.dev.read(pages, n), kv_values(tokens[:n]))

    def teardown(self):
        for pages in self.pins:
            self.cache.unpin(pages)
        for h in self.owned:
            self.tree.release(h)
        assert self.tree.num_live_nodes == 0
        self.cache.clear()
        check_invariants(self.pool)
        assert self.pool.used == 0


KVMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestKVMachine = KVMachine.TestCase

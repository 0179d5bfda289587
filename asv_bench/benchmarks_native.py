"""asv benchmarks of the native KV core (dendrite._native via dendrite.kv).

Fork latency at 1K/16K/128K-token contexts, natively (C++ steady_clock, as a
tracked value in ns) and through Python; append; CSR export for 64 leaves;
radix prefix match. benchmarks/bench_native.py prints the same as a table.
"""

import numpy as np

from dendrite import _native
from dendrite.kv import BlockPool, KVTree, RadixCache

PAGE = 16
CONTEXTS = [1024, 16 * 1024, 128 * 1024]


def _context(num_tokens, extra_pages=4096):
    pool = BlockPool(num_tokens // PAGE + extra_pages, page_size=PAGE)
    tree = KVTree(pool)
    root = tree.new_sequence()
    tree.append(root, np.arange(num_tokens, dtype=np.int32) % 32000)
    return pool, tree, root


class Fork:
    """fork(node, 1) of a context of `context` tokens; children released in teardown."""

    params = CONTEXTS
    param_names = ["context"]

    def setup(self, context):
        self.pool, self.tree, self.root = _context(context)
        self.kids = []

    def teardown(self, context):
        for k in self.kids:
            self.tree.release(k)

    def time_fork_python(self, context):
        self.kids.append(self.tree.fork(self.root, 1)[0])

    def track_fork_native_ns(self, context):
        return _native.bench_fork_ns(self.tree, self.root, 10000, 7)

    track_fork_native_ns.unit = "ns"


class Append:
    params = CONTEXTS
    param_names = ["context"]

    def setup(self, context):
        self.pool, self.tree, self.root = _context(context)
        self.leaf = self.tree.fork_one(self.root)
        self.leaves = np.array(self.tree.fork(self.root, 64), dtype=np.int64)
        self.one = np.array([7], dtype=np.int32)
        self.counts = np.ones(64, dtype=np.int32)
        self.toks = np.full(64, 5, dtype=np.int32)

    def time_append_one_token(self, context):
        self.tree.append(self.leaf, self.one)

    def time_append_batch_64_leaves(self, context):
        self.tree.append_batch(self.leaves, self.counts, self.toks)


class ExportCSR:
    params = CONTEXTS
    param_names = ["context"]

    def setup(self, context):
        self.pool, self.tree, self.root = _context(context)
        self.leaves = np.array(self.tree.fork(self.root, 64), dtype=np.int64)
        for leaf in self.leaves:
            self.tree.append(int(leaf), np.arange(40, dtype=np.int32))

    def time_export_csr_64_leaves(self, context):
        self.tree.export_csr(self.leaves)


class RadixMatch:
    params = CONTEXTS
    param_names = ["context"]

    def setup(self, context):
        self.pool, self.tree, self.root = _context(context)
        self.cache = RadixCache(self.pool)
        self.tokens = self.tree.tokens(self.root)
        self.cache.insert(self.tokens, self.tree.pages(self.root), now=0.0)

    def time_match_prefix_full_hit(self, context):
        self.cache.match_prefix(self.tokens, now=1.0, pin=False)

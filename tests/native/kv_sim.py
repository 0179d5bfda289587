"""kv_sim: a simulated device KV cache for the native-core tests.

`DeviceKV` stands in for the model's paged KV tensor: one int64 "K/V value"
per slot. A token's value depends on its position and every token before it
(like real K/V), so reading a sequence back through its pages checks both
page ownership and prefix sharing.
"""

from __future__ import annotations

import numpy as np

from dendrite.kv import BlockPool, KVTree


def kv_values(tokens: np.ndarray) -> np.ndarray:
    """Prefix-dependent stand-in for the K/V of each token of a sequence."""
    t = np.asarray(tokens, dtype=np.int64)
    weights = np.arange(1, len(t) + 1, dtype=np.int64)
    return (np.cumsum((t + 7) * weights * 2654435761) % (2**31 - 1)) + 1


class DeviceKV:
    """Slots of a BlockPool as a numpy array, written the way the model runner would."""

    def __init__(self, pool: BlockPool):
        self.ps = pool.page_size
        self.kv = np.zeros(pool.num_pages * pool.page_size, dtype=np.int64)

    def run_copies(self, copies: np.ndarray) -> None:
        for src, dst, n in np.asarray(copies).reshape(-1, 3):
            self.kv[dst * self.ps: dst * self.ps + n] = self.kv[src * self.ps: src * self.ps + n]

    def write(self, tree: KVTree, node: int, slots: np.ndarray) -> None:
        """After an append to `node`: store the new tokens' values at `slots`."""
        values = kv_values(tree.tokens(node))
        if len(slots):
            self.kv[slots] = values[len(values) - len(slots):]

    def read(self, pages: np.ndarray, num_tokens: int) -> np.ndarray:
        pos = np.arange(num_tokens)
        return self.kv[np.asarray(pages, dtype=np.int64)[pos // self.ps] * self.ps + pos % self.ps]

    def check_sequence(self, tree: KVTree, node: int) -> None:
        n = tree.num_tokens(node)
        got = self.read(tree.pages(node), n)
        np.testing.assert_array_equal(got, kv_values(tree.tokens(node)))

    def check_all(self, tree: KVTree) -> None:
        for h in tree.debug_live_nodes():
            self.check_sequence(tree, int(h))

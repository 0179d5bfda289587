"""Dendrite: an LLM inference engine for tree search (O(1) copy-on-write fork of paged KV state)."""

from dendrite.kv import BlockPool, KVTree, OutOfPages, RadixCache

__all__ = ["BlockPool", "KVTree", "OutOfPages", "RadixCache"]

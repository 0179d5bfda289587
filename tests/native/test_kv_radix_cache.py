"""RadixCache: page-granular match, pinning, insert, LRU/TTL eviction, stats."""

import numpy as np
import pytest

from dendrite.kv import BlockPool, KVTree, RadixCache, check_invariants


def finished_sequence(tree, tokens):
    n = tree.new_sequence()
    tree.append(n, tokens)
    return n


def test_insert_match_and_reuse(tree, cache, pool):
    a = finished_sequence(tree, np.arange(10))
    assert cache.insert(tree.tokens(a), tree.pages(a), now=0.0) == 2  # full pages only
    assert cache.insert(tree.tokens(a), tree.pages(a), now=0.0) == 0  # already cached
    tree.release(a)
    assert pool.used == 2 and cache.num_entries == 2
    n, pages = cache.match_prefix(np.arange(11), now=1.0)
    assert n == 8 and pages.dtype == np.int32 and len(pages) == 2
    assert cache.num_pinned == 1
    b = tree.new_sequence_from_prefix(pages, n, np.arange(8))
    cache.unpin(pages)
    tree.append(b, [8, 9, 10])
    assert tree.tokens(b).tolist() == list(range(11))
    n2, _ = cache.match_prefix([0, 1, 2, 9, 9], pin=False)
    assert n2 == 0  # first page differs in its last token
    s = cache.stats()
    assert s["queries"] == 2 and s["hits"] == 1 and s["tokens_saved"] == 8
    assert s["hit_rate"] == 0.5 and s["token_hit_rate"] == pytest.approx(8 / 16)
    tree.release(b)


def test_pinned_entries_survive_eviction(tree, cache, pool):
    a = finished_sequence(tree, np.arange(16))
    cache.insert(tree.tokens(a), tree.pages(a))
    tree.release(a)
    n, pages = cache.match_prefix(np.arange(16))
    assert cache.evict(100) == 0 and cache.num_entries == 4
    cache.unpin(int(pages[-1]))  # an int page id works too
    with pytest.raises(ValueError):
        cache.unpin(pages)
    assert cache.evict(100) == 4 and pool.used == 0
    assert cache.stats()["evictions"] == 4 and cache.stats()["pages_freed"] == 4


def test_evict_skips_pages_held_by_live_sequences(tree, cache, pool):
    a = finished_sequence(tree, np.arange(8))
    cache.insert(tree.tokens(a), tree.pages(a))
    b = finished_sequence(tree, np.arange(100, 108))
    cache.insert(tree.tokens(b), tree.pages(b))
    tree.release(b)
    assert cache.evict(100) == 2  # b's pages; a's are still in use
    assert cache.num_entries == 2
    tree.release(a)
    assert cache.evict(1) == 1


def test_lru_order(cache, pool, tree):
    seqs = [finished_sequence(tree, [s] * 4) for s in range(3)]
    for i, s in enumerate(seqs):
        cache.insert(tree.tokens(s), tree.pages(s), now=float(i))
        tree.release(s)
    cache.match_prefix([0] * 4, now=10.0, pin=False)  # 0 becomes most recent
    assert cache.evict(1) == 1
    assert cache.match_prefix([1] * 4, pin=False)[0] == 0  # 1 was the LRU entry
    assert cache.match_prefix([0] * 4, pin=False)[0] == 4


def test_ttl_eviction_cascades(cache, tree, pool):
    a = finished_sequence(tree, np.arange(12))
    cache.insert(tree.tokens(a), tree.pages(a), now=0.0)
    b = finished_sequence(tree, np.arange(100, 104))
    cache.insert(tree.tokens(b), tree.pages(b), now=50.0)
    tree.release(a)
    tree.release(b)
    assert cache.evict_expired(now=60.0, ttl=30.0) == 3  # a's chain, leaf first
    assert cache.num_entries == 1 and pool.used == 1
    assert cache.clear() == 1 and pool.used == 0


def test_branching_prefixes(cache, tree, pool):
    common = list(range(8))
    x = finished_sequence(tree, common + [1, 1, 1, 1])
    y = finished_sequence(tree, common + [2, 2, 2, 2])
    assert cache.insert(tree.tokens(x), tree.pages(x)) == 3
    # y computed the same first 8 tokens into its own pages: only its tail is new.
    assert cache.insert(tree.tokens(y), tree.pages(y)) == 1
    assert cache.num_entries == 4
    n, pages = cache.match_prefix(common + [2, 2, 2, 2], pin=False)
    assert n == 12 and pages[-1] == tree.pages(y)[-1] and pages[0] == tree.pages(x)[0]
    tree.release(x)
    tree.release(y)


def test_bad_insert_changes_nothing(cache, pool):
    with pytest.raises(ValueError):
        cache.insert(np.arange(8), [0, 1])  # pages not allocated
    assert cache.num_entries == 0
    check_invariants(pool)


def test_cache_sees_sequence_pages_after_truncate(tree, cache):
    a = finished_sequence(tree, np.arange(8))
    cache.insert(tree.tokens(a), tree.pages(a))
    tree.truncate(a, 6)
    res = tree.append(a, [99])  # must not write into the cached page
    assert res.copies.shape == (1, 3)
    n, pages = cache.match_prefix(np.arange(8), pin=False)
    assert n == 8
    tree.release(a)

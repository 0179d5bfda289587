"""Randomized op fuzzing driven from C++ (_native.run_fuzz), >= 1e5 ops per run.

The native driver checks invariants every 64 ops and simulates the device KV
(copy-on-write copies, then writes) to verify every sequence and every radix
match reads back exactly its own K/V. The 1e6-op variants are marked slow.
"""

import pytest

from dendrite import _native

CONFIGS = [(1, 4), (2, 3), (3, 16)]  # (seed, page_size)


@pytest.mark.parametrize("seed,page_size", CONFIGS)
def test_fuzz_1e5(seed, page_size):
    stats = _native.run_fuzz(seed, 100_000, num_pages=96, page_size=page_size, check_every=64)
    assert stats["ops"] == 100_000
    # The run must actually exercise the interesting paths.
    assert stats["cow_copies"] > 0 and stats["match_hits"] > 0 and stats["out_of_pages"] > 0
    assert stats["frozen_errors"] > 0 and stats["subtree_releases"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed,page_size", CONFIGS)
def test_fuzz_1e6(seed, page_size):
    stats = _native.run_fuzz(1000 + seed, 1_000_000, num_pages=160, page_size=page_size,
                             check_every=128)
    assert stats["ops"] == 1_000_000

// fuzz.h - randomized driver over BlockPool + KVTree + RadixCache.
//
// Test code, shared by the C++ test binary (so sanitizer builds get native
// coverage) and the Python tests (via _native.run_fuzz). Besides the
// structural invariants it simulates the device KV cache: every appended
// token writes a value that depends on the whole prefix (like real K/V) at
// its slot after the copy-on-write copies ran, and every live sequence and
// every radix match must read back exactly its own values through its pages.
#pragma once

#include <cstdint>

namespace dendrite {

struct FuzzConfig {
  uint64_t seed = 0;
  int64_t num_ops = 100000;
  int32_t num_pages = 96;
  int32_t page_size = 4;
  int32_t cow_headroom = 2;
  int32_t vocab = 3;          // small, so prefixes repeat and the cache hits
  int64_t check_every = 64;   // full invariant + data check period (ops)
  int32_t max_handles = 48;
};

struct FuzzStats {
  int64_t ops = 0, forks = 0, appends = 0, batch_appends = 0, truncates = 0, releases = 0,
          subtree_releases = 0, matches = 0, match_hits = 0, inserts = 0, evicted_pages = 0,
          out_of_pages = 0, frozen_errors = 0, cow_copies = 0, checks = 0, max_live_nodes = 0;
};

// Throws std::runtime_error describing the first violation.
FuzzStats run_fuzz(const FuzzConfig& cfg);

}  // namespace dendrite

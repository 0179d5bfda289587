// invariants.h - cross-structure consistency check of a pool and its users.
//
// Used by the C++ tests, the native fuzz driver and (via bindings) the Python
// tests. Everything is recomputed from scratch, so it is O(pages + nodes).
#pragma once

#include <string>
#include <vector>

#include "block_pool.h"
#include "kv_tree.h"
#include "radix_cache.h"

namespace dendrite {

// Problems found (empty when consistent): every page's refcount equals the
// references held by the trees' nodes plus the caches' entries; the free list
// holds exactly the zero-ref pages, once each; plus each structure's own
// validate().
std::vector<std::string> check_invariants(const BlockPool& pool,
                                          const std::vector<const KVTree*>& trees,
                                          const std::vector<const RadixCache*>& caches);

}  // namespace dendrite

// invariants.cpp - see invariants.h.
#include "invariants.h"

namespace dendrite {

std::vector<std::string> check_invariants(const BlockPool& pool,
                                          const std::vector<const KVTree*>& trees,
                                          const std::vector<const RadixCache*>& caches) {
  std::vector<std::string> err;
  const size_t n = static_cast<size_t>(pool.num_pages());
  std::vector<int64_t> expected(n, 0);
  for (const KVTree* t : trees) {
    if (t->pool().get() != &pool) err.push_back("a KVTree uses a different pool");
    for (auto& e : t->validate()) err.push_back(e);
    const auto refs = t->debug_page_refs();
    for (size_t p = 0; p < n; ++p) expected[p] += refs[p];
  }
  for (const RadixCache* c : caches) {
    if (c->pool().get() != &pool) err.push_back("a RadixCache uses a different pool");
    for (auto& e : c->validate()) err.push_back(e);
    const auto refs = c->debug_page_refs();
    for (size_t p = 0; p < n; ++p) expected[p] += refs[p];
  }
  const auto& rc = pool.debug_refcounts();
  for (size_t p = 0; p < n; ++p)
    if (rc[p] != expected[p])
      err.push_back("page " + std::to_string(p) + ": refcount " + std::to_string(rc[p]) +
                    " but " + std::to_string(expected[p]) + " references");
  std::vector<int> on_free_list(n, 0);
  for (int32_t p : pool.debug_free_list()) {
    if (p < 0 || static_cast<size_t>(p) >= n) {
      err.push_back("free list holds out-of-range page " + std::to_string(p));
      continue;
    }
    if (++on_free_list[static_cast<size_t>(p)] > 1)
      err.push_back("page " + std::to_string(p) + " is on the free list twice");
  }
  for (size_t p = 0; p < n; ++p)
    if ((rc[p] == 0) != (on_free_list[p] > 0))
      err.push_back("page " + std::to_string(p) + ": refcount " + std::to_string(rc[p]) +
                    (on_free_list[p] ? " but on the free list" : " but not on the free list"));
  if (pool.used() > pool.high_watermark()) err.push_back("used above high watermark");
  return err;
}

}  // namespace dendrite

// radix_cache.h - page-granular prefix cache: token ids -> KV pages.
//
// A trie whose every edge is one full page (page_size token ids) and whose
// node holds one reference on that page, in the same BlockPool and refcount
// scheme as KVTree. Only full pages are cached, so a cached page is never
// written again (a sequence that truncates into one copies it on write).
//
// match_prefix pins the deepest matched entry (its ancestors are protected
// because they have a child) until unpin(), so the pages cannot be evicted
// between the match and KVTree::new_sequence_from_prefix. Eviction takes
// unpinned leaves in LRU order; evict(n) skips entries whose page is still
// referenced elsewhere since dropping them would free nothing.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_pool.h"

namespace dendrite {

struct RadixStats {
  int64_t queries = 0;         // match_prefix calls
  int64_t hits = 0;            // calls that matched at least one page
  int64_t tokens_queried = 0;  // token ids passed to match_prefix
  int64_t tokens_matched = 0;  // tokens served from cache (prefill saved)
  int64_t inserted_pages = 0;  // entries created by insert
  int64_t evictions = 0;       // entries removed by evict / evict_expired / clear
  int64_t pages_freed = 0;     // of those, pages that went back to the pool
};

class RadixCache {
 public:
  explicit RadixCache(std::shared_ptr<BlockPool> pool);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  const std::shared_ptr<BlockPool>& pool() const { return pool_; }

  // Longest cached page-aligned prefix of tokens[0:n]: appends its pages to
  // pages_out and returns the number of tokens matched. With pin, the match
  // stays unevictable until unpin(last matched page).
  int64_t match_prefix(const int32_t* tokens, int64_t n, double now,
                       std::vector<int32_t>& pages_out, bool pin = true);
  void unpin(int32_t last_page);

  // Caches the full pages of a finished sequence; chunks already cached are
  // kept as they are. Returns the number of pages newly cached (each gets one
  // reference). Throws invalid_argument before any change on bad pages.
  int64_t insert(const int32_t* tokens, int64_t n, const int32_t* pages, int64_t num_pages,
                 double now);

  int64_t evict(int64_t num_pages);              // returns pages freed to the pool
  int64_t evict_expired(double now, double ttl);  // returns entries evicted
  int64_t clear();                               // evicts every unpinned entry

  const RadixStats& stats() const { return stats_; }
  void reset_stats() { stats_ = RadixStats{}; }
  int64_t num_entries() const { return num_entries_; }
  int64_t num_pinned() const { return num_pinned_; }
  int64_t num_evictable() const { return static_cast<int64_t>(lru_.size()); }

  std::vector<int32_t> debug_page_refs() const;
  std::vector<std::string> validate() const;

 private:
  struct Entry {
    int32_t parent = -1;
    int32_t page = -1;
    int32_t pin = 0;
    int32_t num_children = 0;
    uint64_t key = 0;
    uint64_t tick = 0;
    double time = 0.0;
    bool alive = false;
    bool in_lru = false;
  };
  struct Identity {
    size_t operator()(uint64_t k) const { return static_cast<size_t>(k); }
  };

  uint64_t key_of(int32_t parent, const int32_t* chunk) const;
  int32_t find_child(int32_t parent, const int32_t* chunk, uint64_t key) const;
  int32_t new_entry();
  void touch(int32_t slot, uint64_t tick, double now);
  void refresh_lru(int32_t slot);
  bool evict_entry(int32_t slot);  // returns true when the page was freed

  std::shared_ptr<BlockPool> pool_;
  int32_t page_size_;
  std::vector<Entry> entries_;          // slot 0 is the root (no page)
  std::vector<int32_t> tokens_;         // page_size ids per slot
  std::vector<int32_t> free_slots_;
  std::vector<int32_t> page_owner_;     // page -> entry slot or -1
  std::unordered_multimap<uint64_t, int32_t, Identity> children_;
  std::set<std::pair<uint64_t, int32_t>> lru_;  // unpinned leaves by last use
  uint64_t tick_ = 0;
  int64_t num_entries_ = 0;
  int64_t num_pinned_ = 0;
  RadixStats stats_;
};

}  // namespace dendrite

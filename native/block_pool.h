// block_pool.h - refcounted pool of fixed-size KV pages with a free list.
//
// A page id is an int32 in [0, num_pages). Every holder of a page (a KV-tree
// node's own page list, a radix-cache entry) owns exactly one reference; a
// page returns to the free list when its count drops to zero. `cow_headroom`
// pages are kept back for copy-on-write copies so that a batch of forked
// children can always make their first write even when the pool is nearly
// full. Allocation is all-or-nothing: OutOfPages leaves the pool untouched.
//
// The pool also knows its users (the KVTrees and RadixCaches built on it, as
// registered by their creator) so a consistency check can find every holder
// of page references without the caller listing them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dendrite {

class KVTree;
class RadixCache;

class BlockPool {
 public:
  BlockPool(int32_t num_pages, int32_t page_size = 16, int32_t cow_headroom = 0);

  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t page_size() const { return page_size_; }
  int32_t cow_headroom() const { return cow_headroom_; }
  int32_t used() const { return num_pages() - free(); }
  int32_t free() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t high_watermark() const { return high_watermark_; }
  void reset_high_watermark() { high_watermark_ = used(); }

  // Can `regular` ordinary pages plus `cow` copy-on-write pages be handed out
  // at once? Ordinary pages may not dip into the headroom; COW pages may.
  bool can_allocate(int64_t regular, int64_t cow = 0) const;

  // One ordinary page, refcount 1.
  int32_t allocate();
  // `regular` ordinary + `cow` copy-on-write pages, each with refcount 1,
  // appended to `out` (ordinary ones first). Throws OutOfPages before any
  // change if they do not all fit.
  void allocate_batch(int64_t regular, int64_t cow, std::vector<int32_t>& out);

  void incref(int32_t page);
  // Returns true when the page went back to the free list.
  bool decref(int32_t page);
  // All or nothing: every page valid and holding a reference per occurrence.
  void decref_batch(const int32_t* pages, int64_t n);
  // decref for destructors: never throws; a page that is out of range or
  // already free (a caller's stray decref) is skipped instead of aborting.
  void drop_ref(int32_t page) noexcept;

  int32_t refcount(int32_t page) const;

  // Debug views for invariant checks.
  const std::vector<int32_t>& debug_refcounts() const { return refcount_; }
  const std::vector<int32_t>& debug_free_list() const { return free_list_; }

  // Registers a structure built on this pool (invalid_argument if it uses
  // another pool). Weak: a registration keeps nothing alive. Whoever creates
  // users under shared ownership registers them (the Python bindings do);
  // the structures cannot do it themselves, a constructor has no weak_ptr
  // to itself.
  void add_user(const std::shared_ptr<KVTree>& tree);
  void add_user(const std::shared_ptr<RadixCache>& cache);
  // Registered users still alive, in registration order.
  std::vector<std::shared_ptr<KVTree>> live_trees() const;
  std::vector<std::shared_ptr<RadixCache>> live_caches() const;

 private:
  void check_page(int32_t page) const;
  int32_t pop_free();

  int32_t page_size_;
  int32_t cow_headroom_;
  int32_t high_watermark_ = 0;
  std::vector<int32_t> refcount_;
  // LIFO stack: recently freed pages are reused first (warm in caches);
  // initially ordered so allocation hands out 0, 1, 2, ...
  std::vector<int32_t> free_list_;
  std::vector<std::weak_ptr<KVTree>> tree_users_;
  std::vector<std::weak_ptr<RadixCache>> cache_users_;
};

}  // namespace dendrite

// block_pool.cpp - BlockPool: refcounts, free list, headroom accounting.
#include "block_pool.h"

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "errors.h"
#include "kv_tree.h"
#include "radix_cache.h"

namespace dendrite {

BlockPool::BlockPool(int32_t num_pages, int32_t page_size, int32_t cow_headroom)
    : page_size_(page_size), cow_headroom_(cow_headroom) {
  if (num_pages < 0) throw std::invalid_argument("num_pages must be >= 0");
  if (page_size <= 0) throw std::invalid_argument("page_size must be > 0");
  if (cow_headroom < 0 || cow_headroom > num_pages)
    throw std::invalid_argument("cow_headroom must be in [0, num_pages]");
  // Slots (page * page_size + offset) are exported as int32.
  if (static_cast<int64_t>(num_pages) * page_size > INT32_MAX)
    throw std::invalid_argument("BlockPool: num_pages * page_size = " + std::to_string(num_pages) +
                                " * " + std::to_string(page_size) +
                                " must be < 2**31 (slot ids are int32)");
  refcount_.assign(static_cast<size_t>(num_pages), 0);
  free_list_.resize(static_cast<size_t>(num_pages));
  for (int32_t i = 0; i < num_pages; ++i) free_list_[static_cast<size_t>(i)] = num_pages - 1 - i;
}

bool BlockPool::can_allocate(int64_t regular, int64_t cow) const {
  if (regular < 0 || cow < 0) return false;
  const int64_t f = free();
  return regular <= f - cow_headroom_ && regular + cow <= f;
}

int32_t BlockPool::pop_free() {
  const int32_t p = free_list_.back();
  free_list_.pop_back();
  refcount_[static_cast<size_t>(p)] = 1;
  return p;
}

int32_t BlockPool::allocate() {
  if (!can_allocate(1, 0))
    throw OutOfPages("BlockPool: no free page (free=" + std::to_string(free()) +
                     ", cow_headroom=" + std::to_string(cow_headroom_) + ")");
  const int32_t p = pop_free();
  high_watermark_ = std::max(high_watermark_, used());
  return p;
}

void BlockPool::allocate_batch(int64_t regular, int64_t cow, std::vector<int32_t>& out) {
  if (regular < 0 || cow < 0) throw std::invalid_argument("allocate_batch: negative count");
  if (!can_allocate(regular, cow))
    throw OutOfPages("BlockPool: cannot allocate " + std::to_string(regular) + " pages + " +
                     std::to_string(cow) + " copy-on-write pages (free=" + std::to_string(free()) +
                     ", cow_headroom=" + std::to_string(cow_headroom_) + ")");
  out.reserve(out.size() + static_cast<size_t>(regular + cow));
  for (int64_t i = 0; i < regular + cow; ++i) out.push_back(pop_free());
  high_watermark_ = std::max(high_watermark_, used());
}

void BlockPool::check_page(int32_t page) const {
  if (page < 0 || page >= num_pages())
    throw ArgumentRangeError("page id " + std::to_string(page) + " out of range [0, " +
                             std::to_string(num_pages()) + ")");
}

void BlockPool::incref(int32_t page) {
  check_page(page);
  int32_t& rc = refcount_[static_cast<size_t>(page)];
  if (rc <= 0) throw std::invalid_argument("incref of free page " + std::to_string(page));
  ++rc;
}

bool BlockPool::decref(int32_t page) {
  check_page(page);
  int32_t& rc = refcount_[static_cast<size_t>(page)];
  if (rc <= 0) throw std::invalid_argument("decref of free page " + std::to_string(page));
  if (--rc == 0) {
    free_list_.push_back(page);
    return true;
  }
  return false;
}

void BlockPool::decref_batch(const int32_t* pages, int64_t n) {
  // Validate first so a bad id in the middle does not leave a half-applied
  // batch. A page may repeat: it needs as many references as occurrences.
  for (int64_t i = 0; i < n; ++i) check_page(pages[i]);
  std::vector<int32_t> sorted(pages, pages + n);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0, j; i < sorted.size(); i = j) {
    for (j = i + 1; j < sorted.size() && sorted[j] == sorted[i]; ++j) {
    }
    const int32_t rc = refcount_[static_cast<size_t>(sorted[i])];
    if (rc < static_cast<int64_t>(j - i))
      throw std::invalid_argument("decref_batch: page " + std::to_string(sorted[i]) +
                                  " appears " + std::to_string(j - i) + " times but has " +
                                  std::to_string(rc) + " reference(s)");
  }
  for (int64_t i = 0; i < n; ++i) decref(pages[i]);
}

void BlockPool::drop_ref(int32_t page) noexcept {
  if (page < 0 || page >= num_pages()) return;
  int32_t& rc = refcount_[static_cast<size_t>(page)];
  if (rc <= 0) return;
  if (--rc == 0) free_list_.push_back(page);  // capacity is num_pages: cannot throw
}

int32_t BlockPool::refcount(int32_t page) const {
  check_page(page);
  return refcount_[static_cast<size_t>(page)];
}

namespace {

// Drops expired registrations, then appends `user`: the list stays as long
// as the live users plus those that died since the last registration.
template <typename T>
void register_weak(std::vector<std::weak_ptr<T>>& users, const std::shared_ptr<T>& user) {
  users.erase(std::remove_if(users.begin(), users.end(),
                             [](const std::weak_ptr<T>& w) { return w.expired(); }),
              users.end());
  users.push_back(user);
}

template <typename T>
std::vector<std::shared_ptr<T>> lock_all(const std::vector<std::weak_ptr<T>>& users) {
  std::vector<std::shared_ptr<T>> out;
  for (const auto& w : users)
    if (auto s = w.lock()) out.push_back(std::move(s));
  return out;
}

}  // namespace

void BlockPool::add_user(const std::shared_ptr<KVTree>& tree) {
  if (!tree || tree->pool().get() != this)
    throw std::invalid_argument("BlockPool.add_user: the KVTree uses another pool");
  register_weak(tree_users_, tree);
}

void BlockPool::add_user(const std::shared_ptr<RadixCache>& cache) {
  if (!cache || cache->pool().get() != this)
    throw std::invalid_argument("BlockPool.add_user: the RadixCache uses another pool");
  register_weak(cache_users_, cache);
}

std::vector<std::shared_ptr<KVTree>> BlockPool::live_trees() const { return lock_all(tree_users_); }

std::vector<std::shared_ptr<RadixCache>> BlockPool::live_caches() const {
  return lock_all(cache_users_);
}

}  // namespace dendrite

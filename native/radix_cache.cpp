// radix_cache.cpp - RadixCache: match/pin, insert, LRU and TTL eviction.
#include "radix_cache.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace dendrite {

namespace {
uint64_t mix(uint64_t x) {
  // splitmix64 finalizer: cheap and well distributed.
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}
}  // namespace

RadixCache::RadixCache(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {
  if (!pool_) throw std::invalid_argument("RadixCache needs a BlockPool");
  page_size_ = pool_->page_size();
  page_owner_.assign(static_cast<size_t>(pool_->num_pages()), -1);
  entries_.emplace_back();  // root
  entries_[0].alive = true;
  tokens_.resize(static_cast<size_t>(page_size_), 0);
}

RadixCache::~RadixCache() {
  for (size_t s = 1; s < entries_.size(); ++s)
    if (entries_[s].alive) pool_->drop_ref(entries_[s].page);
}

uint64_t RadixCache::key_of(int32_t parent, const int32_t* chunk) const {
  // Two token ids per 64-bit multiply; one full mix at the end. Collisions
  // are harmless (find_child compares the tokens), they only cost time.
  uint64_t h = mix(static_cast<uint64_t>(parent) + 0x9e3779b97f4a7c15ULL);
  int32_t i = 0;
  for (; i + 1 < page_size_; i += 2) {
    const uint64_t w = static_cast<uint64_t>(static_cast<uint32_t>(chunk[i])) |
                       (static_cast<uint64_t>(static_cast<uint32_t>(chunk[i + 1])) << 32);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  if (i < page_size_) h = (h ^ static_cast<uint32_t>(chunk[i])) * 0x100000001b3ULL;
  return mix(h);
}

int32_t RadixCache::find_child(int32_t parent, const int32_t* chunk, uint64_t key) const {
  auto range = children_.equal_range(key);
  for (auto it = range.first; it != range.second; ++it) {
    const int32_t s = it->second;
    if (entries_[static_cast<size_t>(s)].parent == parent &&
        std::memcmp(&tokens_[static_cast<size_t>(s) * static_cast<size_t>(page_size_)], chunk,
                    static_cast<size_t>(page_size_) * sizeof(int32_t)) == 0)
      return s;
  }
  return -1;
}

int32_t RadixCache::new_entry() {
  int32_t s;
  if (!free_slots_.empty()) {
    s = free_slots_.back();
    free_slots_.pop_back();
  } else {
    s = static_cast<int32_t>(entries_.size());
    entries_.emplace_back();
    tokens_.resize(tokens_.size() + static_cast<size_t>(page_size_));
  }
  entries_[static_cast<size_t>(s)] = Entry{};
  entries_[static_cast<size_t>(s)].alive = true;
  ++num_entries_;
  return s;
}

void RadixCache::touch(int32_t slot, uint64_t tick, double now) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  if (e.in_lru) {
    lru_.erase({e.tick, slot});
    lru_.insert({tick, slot});
  }
  e.tick = tick;
  e.time = now;
}

void RadixCache::refresh_lru(int32_t slot) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  const bool want = slot != 0 && e.alive && e.num_children == 0 && e.pin == 0;
  if (want == e.in_lru) return;
  if (want)
    lru_.insert({e.tick, slot});
  else
    lru_.erase({e.tick, slot});
  e.in_lru = want;
}

int64_t RadixCache::match_prefix(const int32_t* tokens, int64_t n, double now,
                                 std::vector<int32_t>& pages_out, bool pin) {
  ++stats_.queries;
  stats_.tokens_queried += n;
  const uint64_t tick = ++tick_;
  int32_t cur = 0;
  int64_t matched = 0;
  for (int64_t i = 0; i + page_size_ <= n; i += page_size_) {
    const int32_t* chunk = tokens + i;
    const int32_t c = find_child(cur, chunk, key_of(cur, chunk));
    if (c < 0) break;
    touch(c, tick, now);
    pages_out.push_back(entries_[static_cast<size_t>(c)].page);
    cur = c;
    matched += page_size_;
  }
  if (matched > 0) {
    ++stats_.hits;
    stats_.tokens_matched += matched;
    if (pin) {
      Entry& e = entries_[static_cast<size_t>(cur)];
      if (e.pin++ == 0) ++num_pinned_;
      refresh_lru(cur);
    }
  }
  return matched;
}

void RadixCache::unpin(int32_t last_page) {
  if (last_page < 0 || last_page >= pool_->num_pages() ||
      page_owner_[static_cast<size_t>(last_page)] < 0)
    throw std::invalid_argument("unpin: page " + std::to_string(last_page) +
                                " is not a cached page");
  const int32_t s = page_owner_[static_cast<size_t>(last_page)];
  Entry& e = entries_[static_cast<size_t>(s)];
  if (e.pin <= 0)
    throw std::invalid_argument("unpin: page " + std::to_string(last_page) + " is not pinned");
  if (--e.pin == 0) --num_pinned_;
  refresh_lru(s);
}

int64_t RadixCache::insert(const int32_t* tokens, int64_t n, const int32_t* pages,
                           int64_t num_pages, double now) {
  const int64_t full = std::min(n / page_size_, num_pages);
  // Read-only walk over the part that is already cached.
  int32_t cur = 0;
  int64_t i = 0;
  std::vector<int32_t> path;
  for (; i < full; ++i) {
    const int32_t* chunk = tokens + i * page_size_;
    const int32_t c = find_child(cur, chunk, key_of(cur, chunk));
    if (c < 0) break;
    path.push_back(c);
    cur = c;
  }
  // Validate the new pages before changing anything.
  std::vector<int32_t> fresh(pages + i, pages + full);
  for (int32_t p : fresh) {
    if (p < 0 || p >= pool_->num_pages() || pool_->refcount(p) <= 0)
      throw std::invalid_argument("insert: page " + std::to_string(p) + " is not allocated");
    if (page_owner_[static_cast<size_t>(p)] >= 0)
      throw std::invalid_argument("insert: page " + std::to_string(p) +
                                  " is already cached under another prefix");
  }
  std::sort(fresh.begin(), fresh.end());
  if (std::adjacent_find(fresh.begin(), fresh.end()) != fresh.end())
    throw std::invalid_argument("insert: a page appears twice");

  const uint64_t tick = ++tick_;
  for (int32_t s : path) touch(s, tick, now);
  for (; i < full; ++i) {
    const int32_t* chunk = tokens + i * page_size_;
    const uint64_t key = key_of(cur, chunk);
    const int32_t s = new_entry();
    Entry& e = entries_[static_cast<size_t>(s)];
    e.parent = cur;
    e.page = pages[i];
    e.key = key;
    e.tick = tick;
    e.time = now;
    std::memcpy(&tokens_[static_cast<size_t>(s) * static_cast<size_t>(page_size_)], chunk,
                static_cast<size_t>(page_size_) * sizeof(int32_t));
    children_.emplace(key, s);
    page_owner_[static_cast<size_t>(e.page)] = s;
    pool_->incref(e.page);
    ++entries_[static_cast<size_t>(cur)].num_children;
    refresh_lru(cur);
    refresh_lru(s);
    cur = s;
  }
  const int64_t added = static_cast<int64_t>(full) - static_cast<int64_t>(path.size());
  stats_.inserted_pages += added;
  return added;
}

bool RadixCache::evict_entry(int32_t slot) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  if (e.in_lru) lru_.erase({e.tick, slot});
  e.in_lru = false;
  auto range = children_.equal_range(e.key);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second == slot) {
      children_.erase(it);
      break;
    }
  page_owner_[static_cast<size_t>(e.page)] = -1;
  const bool freed = pool_->decref(e.page);
  const int32_t parent = e.parent;
  e.alive = false;
  e.page = -1;
  free_slots_.push_back(slot);
  --num_entries_;
  --entries_[static_cast<size_t>(parent)].num_children;
  refresh_lru(parent);
  ++stats_.evictions;
  if (freed) ++stats_.pages_freed;
  return freed;
}

int64_t RadixCache::evict(int64_t num_pages) {
  int64_t freed = 0;
  std::vector<std::pair<uint64_t, int32_t>> skipped;
  while (freed < num_pages && !lru_.empty()) {
    const auto oldest = *lru_.begin();
    Entry& e = entries_[static_cast<size_t>(oldest.second)];
    if (pool_->refcount(e.page) > 1) {
      // A live sequence still reads this page: evicting frees nothing.
      lru_.erase(lru_.begin());
      e.in_lru = false;
      skipped.push_back(oldest);
      continue;
    }
    if (evict_entry(oldest.second)) ++freed;
  }
  for (const auto& k : skipped) {
    lru_.insert(k);
    entries_[static_cast<size_t>(k.second)].in_lru = true;
  }
  return freed;
}

int64_t RadixCache::evict_expired(double now, double ttl) {
  const double cutoff = now - ttl;
  std::vector<int32_t> work;
  for (const auto& k : lru_)
    if (entries_[static_cast<size_t>(k.second)].time < cutoff) work.push_back(k.second);
  int64_t evicted = 0;
  while (!work.empty()) {
    const int32_t s = work.back();
    work.pop_back();
    const int32_t parent = entries_[static_cast<size_t>(s)].parent;
    evict_entry(s);
    ++evicted;
    // The parent may just have become an expired, unpinned leaf.
    const Entry& p = entries_[static_cast<size_t>(parent)];
    if (p.in_lru && p.time < cutoff) work.push_back(parent);
  }
  return evicted;
}

int64_t RadixCache::clear() {
  int64_t evicted = 0;
  while (!lru_.empty()) {
    evict_entry(lru_.begin()->second);
    ++evicted;
  }
  return evicted;
}

std::vector<int32_t> RadixCache::debug_page_refs() const {
  std::vector<int32_t> refs(static_cast<size_t>(pool_->num_pages()), 0);
  for (size_t s = 1; s < entries_.size(); ++s) {
    const Entry& e = entries_[s];
    if (e.alive && e.page >= 0 && e.page < pool_->num_pages()) ++refs[static_cast<size_t>(e.page)];
  }
  return refs;
}

std::vector<std::string> RadixCache::validate() const {
  std::vector<std::string> err;
  auto bad = [&](size_t s, const std::string& what) {
    err.push_back("RadixCache entry slot " + std::to_string(s) + ": " + what);
  };
  std::vector<int32_t> kids(entries_.size(), 0);
  int64_t alive = 0, pinned = 0, in_lru = 0;
  for (size_t s = 1; s < entries_.size(); ++s) {
    const Entry& e = entries_[s];
    if (!e.alive) continue;
    ++alive;
    if (e.pin > 0) ++pinned;
    if (e.pin < 0) bad(s, "negative pin count");
    if (e.in_lru) ++in_lru;
    int64_t steps = 0;
    for (int32_t a = e.parent; a > 0 && steps <= num_entries_; a = entries_[static_cast<size_t>(a)].parent)
      ++steps;
    if (steps > num_entries_) {
      bad(s, "parent chain has a cycle");
      continue;
    }
    if (e.parent < 0 || !entries_[static_cast<size_t>(e.parent)].alive) {
      bad(s, "parent missing");
      continue;
    }
    ++kids[static_cast<size_t>(e.parent)];
    if (e.page < 0 || e.page >= pool_->num_pages() || pool_->refcount(e.page) <= 0) {
      bad(s, "invalid or free page " + std::to_string(e.page));
      continue;
    }
    if (page_owner_[static_cast<size_t>(e.page)] != static_cast<int32_t>(s)) bad(s, "page owner map wrong");
    const int32_t* chunk = &tokens_[s * static_cast<size_t>(page_size_)];
    if (find_child(e.parent, chunk, key_of(e.parent, chunk)) != static_cast<int32_t>(s))
      bad(s, "not reachable through the child map");
    const bool want = e.num_children == 0 && e.pin == 0;
    if (want != e.in_lru || (e.in_lru && lru_.count({e.tick, static_cast<int32_t>(s)}) == 0))
      bad(s, "LRU membership wrong");
  }
  for (size_t s = 0; s < entries_.size(); ++s)
    if (entries_[s].alive && kids[s] != entries_[s].num_children) bad(s, "child count wrong");
  for (size_t p = 0; p < page_owner_.size(); ++p) {
    const int32_t o = page_owner_[p];
    if (o >= 0 && (o == 0 || static_cast<size_t>(o) >= entries_.size() ||
                   !entries_[static_cast<size_t>(o)].alive ||
                   entries_[static_cast<size_t>(o)].page != static_cast<int32_t>(p)))
      err.push_back("RadixCache: page_owner of page " + std::to_string(p) + " is stale");
  }
  if (alive != num_entries_) err.push_back("RadixCache: entry count mismatch");
  if (pinned != num_pinned_) err.push_back("RadixCache: pinned count mismatch");
  if (in_lru != static_cast<int64_t>(lru_.size())) err.push_back("RadixCache: LRU size mismatch");
  if (static_cast<int64_t>(children_.size()) != num_entries_)
    err.push_back("RadixCache: child map size mismatch");
  return err;
}

}  // namespace dendrite

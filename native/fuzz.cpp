// fuzz.cpp - see fuzz.h.
#include "fuzz.h"

#include <algorithm>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "block_pool.h"
#include "errors.h"
#include "invariants.h"
#include "kv_tree.h"
#include "radix_cache.h"

namespace dendrite {

namespace {

int32_t kv_value(int32_t prev, int32_t token) {
  // Stand-in for K/V: depends on the token and everything before it.
  uint32_t x = static_cast<uint32_t>(prev) * 0x9e3779b1u ^ static_cast<uint32_t>(token + 1);
  x ^= x >> 15;
  x *= 0x2c1b3c6du;
  x ^= x >> 12;
  return static_cast<int32_t>(x & 0x7fffffff);
}

class Fuzzer {
 public:
  explicit Fuzzer(const FuzzConfig& cfg)
      : cfg_(cfg),
        rng_(cfg.seed),
        pool_(std::make_shared<BlockPool>(cfg.num_pages, cfg.page_size, cfg.cow_headroom)),
        tree_(std::make_unique<KVTree>(pool_)),
        cache_(std::make_unique<RadixCache>(pool_)),
        kv_(static_cast<size_t>(cfg.num_pages) * static_cast<size_t>(cfg.page_size), -1) {}

  FuzzStats run() {
    for (int64_t i = 0; i < cfg_.num_ops; ++i) {
      step();
      ++st_.ops;
      st_.max_live_nodes = std::max(st_.max_live_nodes, tree_->num_live_nodes());
      if (cfg_.check_every > 0 && (i + 1) % cfg_.check_every == 0) check();
    }
    check();
    // Teardown must return every page.
    for (int64_t h : owned_) tree_->release(h);
    owned_.clear();
    if (tree_->num_live_nodes() != 0) fail("nodes left after releasing every handle");
    cache_->clear();
    check();
    if (pool_->used() != 0) fail("pages still used after releasing everything");
    return st_;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("fuzz(seed=" + std::to_string(cfg_.seed) + ", op=" +
                             std::to_string(st_.ops) + "): " + what);
  }

  int64_t rand(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  int64_t pick_owned() { return owned_[static_cast<size_t>(rand(0, static_cast<int64_t>(owned_.size()) - 1))]; }

  void prune_owned() {
    owned_.erase(std::remove_if(owned_.begin(), owned_.end(),
                                [&](int64_t h) { return !tree_->is_valid(h) || tree_->is_released(h); }),
                 owned_.end());
  }

  std::vector<int32_t> tokens_of(int64_t h) {
    std::vector<int32_t> t(static_cast<size_t>(tree_->num_tokens(h)));
    tree_->tokens(h, t.data());
    return t;
  }
  std::vector<int32_t> pages_of(int64_t h) {
    std::vector<int32_t> p(static_cast<size_t>(tree_->num_pages(h)));
    tree_->pages(h, p.data());
    return p;
  }

  // Device-side execution of one append: copies first, then the writes.
  void device_write(const std::vector<int32_t>& path_tokens_before, const int32_t* new_tokens,
                    int64_t k, const int32_t* slots, const std::vector<int32_t>& copies) {
    const int32_t ps = cfg_.page_size;
    for (size_t c = 0; c + 2 < copies.size(); c += 3)
      for (int32_t o = 0; o < copies[c + 2]; ++o)
        kv_[static_cast<size_t>(copies[c + 1] * ps + o)] = kv_[static_cast<size_t>(copies[c] * ps + o)];
    int32_t prev = 0;
    for (int32_t t : path_tokens_before) prev = kv_value(prev, t);
    for (int64_t i = 0; i < k; ++i) {
      prev = kv_value(prev, new_tokens[i]);
      kv_[static_cast<size_t>(slots[i])] = prev;
    }
  }

  void verify_sequence(const std::vector<int32_t>& toks, const std::vector<int32_t>& pages,
                       const char* what) {
    const int32_t ps = cfg_.page_size;
    if (static_cast<int64_t>(pages.size()) != (static_cast<int64_t>(toks.size()) + ps - 1) / ps)
      fail(std::string(what) + ": page count does not match token count");
    int32_t prev = 0;
    for (size_t i = 0; i < toks.size(); ++i) {
      prev = kv_value(prev, toks[i]);
      const int32_t page = pages[i / static_cast<size_t>(ps)];
      if (kv_[static_cast<size_t>(page * ps) + i % static_cast<size_t>(ps)] != prev)
        fail(std::string(what) + ": token " + std::to_string(i) + " reads back wrong K/V");
    }
  }

  void check() {
    ++st_.checks;
    const auto err = check_invariants(*pool_, {tree_.get()}, {cache_.get()});
    if (!err.empty()) fail("invariant: " + err.front());
    for (int64_t h : tree_->debug_live_nodes()) verify_sequence(tokens_of(h), pages_of(h), "sequence");
  }

  std::vector<int32_t> random_tokens(int64_t k) {
    std::vector<int32_t> t(static_cast<size_t>(k));
    for (auto& x : t) x = static_cast<int32_t>(rand(0, cfg_.vocab - 1));
    return t;
  }

  void relieve_pressure() {
    // What an engine does on OutOfPages: evict cache, else preempt a sequence.
    if (cache_->evict(rand(1, 8)) > 0) return;
    if (!owned_.empty()) {
      tree_->release(pick_owned());
      prune_owned();
    }
  }

  void do_append(int64_t h, int64_t k) {
    const std::vector<int32_t> before = tokens_of(h);
    const std::vector<int32_t> toks = random_tokens(k);
    std::vector<int32_t> slots(static_cast<size_t>(k));
    std::vector<int32_t> copies;
    const int32_t used = pool_->used();
    try {
      tree_->append(h, toks.data(), k, slots.data(), copies);
    } catch (const OutOfPages&) {
      ++st_.out_of_pages;
      if (pool_->used() != used || tree_->num_tokens(h) != static_cast<int64_t>(before.size()))
        fail("OutOfPages changed state");
      relieve_pressure();
      return;
    } catch (const FrozenNode&) {
      ++st_.frozen_errors;
      if (tree_->num_children(h) == 0) fail("FrozenNode on a leaf");
      return;
    }
    if (tree_->num_children(h) != 0) fail("append on a frozen node succeeded");
    ++st_.appends;
    st_.cow_copies += static_cast<int64_t>(copies.size() / 3);
    device_write(before, toks.data(), k, slots.data(), copies);
  }

  void do_append_batch() {
    std::vector<int64_t> leaves;
    for (int64_t h : owned_)
      if (tree_->num_children(h) == 0 && rand(0, 1)) leaves.push_back(h);
    if (leaves.empty()) return;
    std::vector<int32_t> counts;
    std::vector<std::vector<int32_t>> before;
    std::vector<int32_t> all;
    for (int64_t h : leaves) {
      counts.push_back(static_cast<int32_t>(rand(0, 6)));
      before.push_back(tokens_of(h));
      const auto t = random_tokens(counts.back());
      all.insert(all.end(), t.begin(), t.end());
    }
    std::vector<int32_t> slots(all.size());
    std::vector<int32_t> copies;
    const int32_t used = pool_->used();
    try {
      tree_->append_batch(leaves.data(), counts.data(), static_cast<int64_t>(leaves.size()),
                          all.data(), static_cast<int64_t>(all.size()), slots.data(), copies);
    } catch (const OutOfPages&) {
      ++st_.out_of_pages;
      if (pool_->used() != used) fail("OutOfPages in a batch changed the pool");
      for (size_t b = 0; b < leaves.size(); ++b)
        if (tree_->num_tokens(leaves[b]) != static_cast<int64_t>(before[b].size()))
          fail("OutOfPages in a batch changed a sequence");
      relieve_pressure();
      return;
    }
    ++st_.batch_appends;
    st_.cow_copies += static_cast<int64_t>(copies.size() / 3);
    // Copies run once for the whole step, before any write.
    const int32_t ps = cfg_.page_size;
    for (size_t c = 0; c < copies.size(); c += 3)
      for (int32_t o = 0; o < copies[c + 2]; ++o)
        kv_[static_cast<size_t>(copies[c + 1] * ps + o)] = kv_[static_cast<size_t>(copies[c] * ps + o)];
    size_t t = 0;
    static const std::vector<int32_t> none;
    for (size_t b = 0; b < leaves.size(); ++b) {
      device_write(before[b], all.data() + t, counts[b], slots.data() + t, none);
      t += static_cast<size_t>(counts[b]);
    }
  }

  void do_match() {
    ++st_.matches;
    std::vector<int32_t> query;
    if (!owned_.empty() && rand(0, 3) > 0) {
      query = tokens_of(pick_owned());
      query.resize(static_cast<size_t>(rand(0, static_cast<int64_t>(query.size()))));
    }
    const auto tail = random_tokens(rand(0, 10));
    query.insert(query.end(), tail.begin(), tail.end());
    std::vector<int32_t> pages;
    const int64_t matched =
        cache_->match_prefix(query.data(), static_cast<int64_t>(query.size()), now_, pages, true);
    if (matched % cfg_.page_size != 0 || static_cast<int64_t>(pages.size()) * cfg_.page_size != matched)
      fail("match_prefix is not page-granular");
    if (matched == 0) return;
    ++st_.match_hits;
    verify_sequence(std::vector<int32_t>(query.begin(), query.begin() + matched), pages, "radix match");
    if (static_cast<int64_t>(owned_.size()) < cfg_.max_handles && rand(0, 1)) {
      owned_.push_back(tree_->new_sequence_from_prefix(pages.data(), static_cast<int64_t>(pages.size()),
                                                       matched, query.data(), matched));
    }
    // Exercise the pin: an eviction storm must not take pinned pages.
    if (rand(0, 3) == 0) cache_->evict(cfg_.num_pages);
    cache_->unpin(pages.back());
  }

  void do_export() {
    std::vector<int64_t> batch;
    for (int64_t h : tree_->debug_live_nodes())
      if (rand(0, 1)) batch.push_back(h);
    const int64_t nnz = tree_->export_csr_prepare(batch.data(), static_cast<int64_t>(batch.size()));
    std::vector<int32_t> indptr(batch.size() + 1), indices(static_cast<size_t>(nnz)), last(batch.size());
    tree_->export_csr_fill(batch.data(), static_cast<int64_t>(batch.size()), indptr.data(),
                           indices.data(), last.data());
    for (size_t b = 0; b < batch.size(); ++b) {
      const auto pages = pages_of(batch[b]);
      if (!std::equal(pages.begin(), pages.end(), indices.begin() + indptr[b]) ||
          static_cast<size_t>(indptr[b + 1] - indptr[b]) != pages.size())
        fail("export_csr pages differ from pages()");
      const int64_t n = tree_->num_tokens(batch[b]);
      if (last[b] != (n == 0 ? 0 : (n - 1) % cfg_.page_size + 1)) fail("bad kv_last_page_len");
    }
  }

  void step() {
    now_ += 0.25;
    const int64_t op = rand(0, 99);
    const bool room = static_cast<int64_t>(owned_.size()) < cfg_.max_handles;
    if (owned_.empty() || op < 6) {
      if (room) owned_.push_back(tree_->new_sequence());
    } else if (op < 14) {
      do_match();
    } else if (op < 26) {
      if (!room) return;
      std::vector<int64_t> kids;
      tree_->fork(pick_owned(), rand(1, 3), kids);
      owned_.insert(owned_.end(), kids.begin(), kids.end());
      ++st_.forks;
    } else if (op < 50) {
      do_append(pick_owned(), rand(1, 2) == 1 ? 1 : rand(1, 3 * cfg_.page_size));
    } else if (op < 58) {
      do_append_batch();
    } else if (op < 62) {
      const int64_t h = pick_owned();
      if (tree_->num_children(h) != 0) return;
      const int64_t n = tree_->num_tokens(h);
      // Own segment only: it starts where the parent ends.
      const int64_t p = tree_->parent(h);
      const int64_t start = p < 0 ? 0 : tree_->num_tokens(p);
      tree_->truncate(h, rand(start, n));
      ++st_.truncates;
    } else if (op < 78) {
      tree_->release(pick_owned());
      prune_owned();
      ++st_.releases;
    } else if (op < 80) {
      const auto live = tree_->debug_live_nodes();
      tree_->release_subtree(live[static_cast<size_t>(rand(0, static_cast<int64_t>(live.size()) - 1))]);
      prune_owned();
      ++st_.subtree_releases;
    } else if (op < 90) {
      const int64_t h = pick_owned();
      const auto toks = tokens_of(h);
      const auto pages = pages_of(h);
      cache_->insert(toks.data(), static_cast<int64_t>(toks.size()), pages.data(),
                     static_cast<int64_t>(pages.size()), now_);
      ++st_.inserts;
    } else if (op < 95) {
      st_.evicted_pages += cache_->evict(rand(1, 6));
    } else if (op < 97) {
      cache_->evict_expired(now_, rand(1, 40));
    } else {
      do_export();
    }
  }

  FuzzConfig cfg_;
  std::mt19937_64 rng_;
  std::shared_ptr<BlockPool> pool_;
  std::unique_ptr<KVTree> tree_;
  std::unique_ptr<RadixCache> cache_;
  std::vector<int32_t> kv_;
  std::vector<int64_t> owned_;
  double now_ = 0.0;
  FuzzStats st_;
};

}  // namespace

FuzzStats run_fuzz(const FuzzConfig& cfg) {
  if (cfg.num_pages <= 0 || cfg.page_size <= 0 || cfg.vocab <= 0 || cfg.max_handles <= 0)
    throw std::invalid_argument("run_fuzz: bad config");
  return Fuzzer(cfg).run();
}

}  // namespace dendrite

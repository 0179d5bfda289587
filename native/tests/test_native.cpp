// test_native.cpp - self-contained C++ tests of the native core (run by ctest).
//
// No test framework: nothing beyond PyPI/Debian is reachable in CI, and the
// point of this binary is to run the core under ASan/UBSan without loading it
// into a Python interpreter. Usage: test_native [fuzz_ops_per_seed]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "arg_checks.h"
#include "attention_plan.h"
#include "block_pool.h"
#include "errors.h"
#include "fuzz.h"
#include "invariants.h"
#include "kv_tree.h"
#include "radix_cache.h"

using namespace dendrite;

namespace {

int g_failures = 0;
std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> r;
  return r;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

#define TEST(name)                                  \
  void name();                                      \
  const Register reg_##name(#name, name);           \
  void name()

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                             \
    }                                                                           \
  } while (0)

#define CHECK_THROWS(type, expr)                                                     \
  do {                                                                               \
    bool thrown_ = false;                                                            \
    try {                                                                            \
      expr;                                                                          \
    } catch (const type&) {                                                          \
      thrown_ = true;                                                                \
    }                                                                                \
    if (!thrown_) {                                                                  \
      std::fprintf(stderr, "%s:%d: expected %s from %s\n", __FILE__, __LINE__, #type, #expr); \
      ++g_failures;                                                                  \
    }                                                                                \
  } while (0)

void check_ok(const BlockPool& pool, const KVTree* tree, const RadixCache* cache) {
  std::vector<const KVTree*> trees;
  std::vector<const RadixCache*> caches;
  if (tree) trees.push_back(tree);
  if (cache) caches.push_back(cache);
  for (const auto& e : check_invariants(pool, trees, caches)) {
    std::fprintf(stderr, "invariant: %s\n", e.c_str());
    ++g_failures;
  }
}

struct AppendOut {
  std::vector<int32_t> slots;
  std::vector<int32_t> copies;
};

AppendOut append(KVTree& t, int64_t node, std::vector<int32_t> toks) {
  AppendOut r;
  r.slots.resize(toks.size());
  t.append(node, toks.data(), static_cast<int64_t>(toks.size()), r.slots.data(), r.copies);
  return r;
}

std::vector<int32_t> seq(int32_t from, int32_t n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = from + i;
  return v;
}

std::vector<int32_t> pages_of(const KVTree& t, int64_t h) {
  std::vector<int32_t> p(static_cast<size_t>(t.num_pages(h)));
  t.pages(h, p.data());
  return p;
}

// ---- BlockPool -------------------------------------------------------------

TEST(pool_allocate_free_and_stats) {
  BlockPool pool(8, 16, 0);
  CHECK(pool.allocate() == 0);
  CHECK(pool.allocate() == 1);
  std::vector<int32_t> out;
  pool.allocate_batch(3, 0, out);
  CHECK(out.size() == 3 && out[0] == 2 && out[2] == 4);
  CHECK(pool.used() == 5 && pool.free() == 3 && pool.high_watermark() == 5);
  pool.incref(2);
  CHECK(!pool.decref(2));
  CHECK(pool.decref(2));
  CHECK(pool.used() == 4 && pool.high_watermark() == 5);
  CHECK_THROWS(std::invalid_argument, pool.decref(2));
  CHECK_THROWS(std::invalid_argument, pool.incref(2));
  CHECK_THROWS(std::out_of_range, pool.refcount(8));
  CHECK(pool.allocate() == 2);  // LIFO reuse
}

TEST(pool_out_of_pages_is_all_or_nothing) {
  BlockPool pool(4, 16, 1);
  std::vector<int32_t> out;
  CHECK_THROWS(OutOfPages, pool.allocate_batch(4, 0, out));  // headroom is kept back
  CHECK(out.empty() && pool.used() == 0);
  pool.allocate_batch(3, 0, out);
  CHECK_THROWS(OutOfPages, pool.allocate());
  pool.allocate_batch(0, 1, out);  // copy-on-write may use the headroom
  CHECK(pool.used() == 4);
  CHECK_THROWS(OutOfPages, pool.allocate_batch(0, 1, out));
  CHECK(pool.used() == 4 && out.size() == 4);
}

TEST(pool_slot_overflow_is_rejected) {
  CHECK_THROWS(std::invalid_argument, BlockPool(2, 1 << 30, 0));  // 2**31 slots
  BlockPool ok(1, INT32_MAX, 0);  // 2**31 - 1 slots: the last one is INT32_MAX - 1
  CHECK(ok.page_size() == INT32_MAX);
}

TEST(pool_knows_its_live_users) {
  auto pool = std::make_shared<BlockPool>(16, 4);
  auto other = std::make_shared<BlockPool>(16, 4);
  auto t1 = std::make_shared<KVTree>(pool);
  auto t2 = std::make_shared<KVTree>(pool);
  auto c = std::make_shared<RadixCache>(pool);
  pool->add_user(t1);
  pool->add_user(t2);
  pool->add_user(c);
  CHECK(pool->live_trees().size() == 2 && pool->live_trees()[0] == t1);
  CHECK(pool->live_caches().size() == 1 && pool->live_caches()[0] == c);
  CHECK(other->live_trees().empty());
  CHECK_THROWS(std::invalid_argument, other->add_user(t1));  // built on `pool`
  t1.reset();  // a registration keeps nothing alive
  CHECK(pool->live_trees().size() == 1 && pool->live_trees()[0] == t2);
  c.reset();
  CHECK(pool->live_caches().empty());
}

// ---- KVTree ------------------------------------------------------------------

TEST(tree_fork_touches_no_refcounts) {
  auto pool = std::make_shared<BlockPool>(64, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 10));  // 3 pages, last one half full
  const auto before = pool->debug_refcounts();
  std::vector<int64_t> kids;
  t.fork(root, 3, kids);
  CHECK(kids.size() == 3);
  CHECK(pool->debug_refcounts() == before);
  CHECK(t.num_tokens(kids[0]) == 10 && t.parent(kids[0]) == root && t.num_children(root) == 3);
  CHECK(pages_of(t, kids[1]) == pages_of(t, root));
  check_ok(*pool, &t, nullptr);
}

TEST(tree_copy_on_write_of_partial_page) {
  auto pool = std::make_shared<BlockPool>(64, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 6));  // pages [0, 1], page 1 holds 2 tokens
  const auto root_pages = pages_of(t, root);
  const int64_t c = t.fork_one(root);
  const auto r = append(t, c, {100, 101, 102});
  CHECK(r.copies.size() == 3);
  CHECK(r.copies[0] == root_pages[1] && r.copies[2] == 2);  // copy 2 inherited tokens
  const int32_t dst = r.copies[1];
  CHECK(dst != root_pages[1]);
  CHECK(r.slots[0] == dst * 4 + 2 && r.slots[1] == dst * 4 + 3);
  CHECK(r.slots[2] / 4 != dst && r.slots[2] % 4 == 0);
  CHECK(pages_of(t, root) == root_pages);
  const auto cp = pages_of(t, c);
  CHECK(cp.size() == 3 && cp[0] == root_pages[0] && cp[1] == dst);
  // Second write of the child is in place: no more copies.
  CHECK(append(t, c, {7}).copies.empty());
  check_ok(*pool, &t, nullptr);
}

TEST(tree_aligned_fork_needs_no_copy) {
  auto pool = std::make_shared<BlockPool>(64, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 8));
  const int64_t c = t.fork_one(root);
  const auto r = append(t, c, {1});
  CHECK(r.copies.empty());
  CHECK(pages_of(t, c).size() == 3);
  check_ok(*pool, &t, nullptr);
}

TEST(tree_frozen_node_rejects_append) {
  auto pool = std::make_shared<BlockPool>(16, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 3));
  t.fork_one(root);
  CHECK_THROWS(FrozenNode, append(t, root, {1}));
  CHECK_THROWS(FrozenNode, t.truncate(root, 1));
  CHECK(t.num_tokens(root) == 3);
}

TEST(tree_release_cascades_and_returns_pages) {
  auto pool = std::make_shared<BlockPool>(64, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 5));
  std::vector<int64_t> kids;
  t.fork(root, 2, kids);
  append(t, kids[0], seq(10, 9));
  append(t, kids[1], seq(20, 1));
  t.release(root);  // stays alive: it has children
  CHECK(t.is_valid(root) && t.is_released(root));
  CHECK_THROWS(std::invalid_argument, t.release(root));
  t.release(kids[0]);
  CHECK(t.is_valid(root));
  t.release(kids[1]);
  CHECK(!t.is_valid(root) && t.num_live_nodes() == 0 && pool->used() == 0);
  check_ok(*pool, &t, nullptr);
}

TEST(tree_release_subtree) {
  auto pool = std::make_shared<BlockPool>(64, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 5));
  const int64_t a = t.fork_one(root);
  append(t, a, seq(0, 7));
  std::vector<int64_t> g;
  t.fork(a, 3, g);
  for (int64_t x : g) append(t, x, {1, 2});
  const int64_t b = t.fork_one(root);
  t.release_subtree(a);
  CHECK(!t.is_valid(a) && !t.is_valid(g[2]) && t.is_valid(b) && t.num_live_nodes() == 2);
  check_ok(*pool, &t, nullptr);
  t.release(b);
  t.release(root);
  CHECK(pool->used() == 0);
}

TEST(tree_append_out_of_pages_changes_nothing) {
  auto pool = std::make_shared<BlockPool>(3, 4, 1);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 6));  // 2 pages: the rest is headroom
  const int64_t c = t.fork_one(root);
  CHECK_THROWS(OutOfPages, append(t, c, seq(0, 3)));  // needs COW + 1 new page
  CHECK(t.num_tokens(c) == 6 && pool->used() == 2);
  CHECK(append(t, c, seq(0, 2)).copies.size() == 3);  // COW alone uses headroom
  check_ok(*pool, &t, nullptr);
}

TEST(tree_truncate_and_shared_last_page) {
  auto pool = std::make_shared<BlockPool>(32, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 8));
  RadixCache cache(pool);
  const auto toks = seq(0, 8);
  const auto pages = pages_of(t, root);
  CHECK(cache.insert(toks.data(), 8, pages.data(), 2, 0.0) == 2);
  t.truncate(root, 6);  // last page now partial and shared with the cache
  const auto r = append(t, root, {50});
  CHECK(r.copies.size() == 3 && r.copies[0] == pages[1] && r.copies[2] == 2);
  check_ok(*pool, &t, &cache);
  CHECK_THROWS(std::invalid_argument, t.truncate(root, 8));
}

TEST(tree_from_prefix_and_tokens) {
  auto pool = std::make_shared<BlockPool>(32, 4);
  KVTree t(pool);
  const int64_t a = t.new_sequence();
  append(t, a, seq(0, 8));
  const auto pages = pages_of(t, a);
  const auto toks = seq(0, 8);
  const int64_t b = t.new_sequence_from_prefix(pages.data(), 2, 8, toks.data(), 8);
  CHECK(pool->refcount(pages[0]) == 2);
  CHECK_THROWS(std::invalid_argument, t.new_sequence_from_prefix(pages.data(), 1, 8, toks.data(), 8));
  const int64_t c = t.fork_one(b);
  append(t, c, {9, 9});
  std::vector<int32_t> out(10);
  t.tokens(c, out.data());
  CHECK(out[0] == 0 && out[7] == 7 && out[8] == 9 && out[9] == 9);
  check_ok(*pool, &t, nullptr);
}

TEST(tree_export_csr_matches_pages) {
  auto pool = std::make_shared<BlockPool>(256, 4);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 13));
  std::vector<int64_t> l1;
  t.fork(root, 2, l1);
  append(t, l1[0], seq(0, 3));
  std::vector<int64_t> l2;
  t.fork(l1[0], 3, l2);
  append(t, l2[1], seq(0, 5));
  std::vector<int64_t> batch = {l2[0], l2[1], l2[2], l1[1], root};
  for (int round = 0; round < 2; ++round) {  // second round uses the caches
    const int64_t nnz = t.export_csr_prepare(batch.data(), 5);
    std::vector<int32_t> indptr(6), idx(static_cast<size_t>(nnz)), last(5);
    t.export_csr_fill(batch.data(), 5, indptr.data(), idx.data(), last.data());
    for (size_t b = 0; b < 5; ++b) {
      const auto p = pages_of(t, batch[b]);
      CHECK(std::vector<int32_t>(idx.begin() + indptr[b], idx.begin() + indptr[b + 1]) == p);
      const int64_t n = t.num_tokens(batch[b]);
      CHECK(last[b] == (n - 1) % 4 + 1);
    }
    check_ok(*pool, &t, nullptr);
  }
}

// ---- RadixCache ----------------------------------------------------------------

TEST(radix_match_insert_pin_evict) {
  auto pool = std::make_shared<BlockPool>(32, 4);
  KVTree t(pool);
  RadixCache cache(pool);
  const int64_t a = t.new_sequence();
  append(t, a, seq(0, 10));
  const auto ta = seq(0, 10);
  const auto pa = pages_of(t, a);
  CHECK(cache.insert(ta.data(), 10, pa.data(), 3, 1.0) == 2);  // 2 full pages
  t.release(a);
  CHECK(pool->used() == 2);
  std::vector<int32_t> got;
  const auto q = seq(0, 9);
  CHECK(cache.match_prefix(q.data(), 9, 2.0, got, true) == 8);
  CHECK(got.size() == 2 && got[0] == pa[0] && got[1] == pa[1]);
  CHECK(cache.evict(10) == 0);  // pinned
  cache.unpin(got.back());
  CHECK_THROWS(std::invalid_argument, cache.unpin(got.back()));
  CHECK(cache.stats().hits == 1 && cache.stats().tokens_matched == 8);
  CHECK(cache.evict(1) == 1 && cache.num_entries() == 1);
  CHECK(cache.evict(10) == 1 && pool->used() == 0);
  check_ok(*pool, &t, &cache);
}

TEST(radix_lru_order_and_ttl) {
  auto pool = std::make_shared<BlockPool>(32, 2);
  RadixCache cache(pool);
  std::vector<std::vector<int32_t>> page_sets;
  for (int32_t s = 0; s < 3; ++s) {
    std::vector<int32_t> pages;
    pool->allocate_batch(1, 0, pages);
    const std::vector<int32_t> toks = {s, s};
    cache.insert(toks.data(), 2, pages.data(), 1, static_cast<double>(s));
    pool->decref(pages[0]);  // the cache holds the only reference now
    page_sets.push_back(pages);
  }
  std::vector<int32_t> got;
  const std::vector<int32_t> q0 = {0, 0};
  cache.match_prefix(q0.data(), 2, 10.0, got, false);  // entry 0 is now the most recent
  CHECK(cache.evict(1) == 1);
  got.clear();
  const std::vector<int32_t> q1 = {1, 1};
  CHECK(cache.match_prefix(q1.data(), 2, 10.0, got, false) == 0);  // entry 1 went first
  CHECK(cache.evict_expired(11.0, 5.0) == 1);                      // entry 2 (t=2) expired
  CHECK(cache.num_entries() == 1);
  check_ok(*pool, nullptr, &cache);
  cache.clear();
  CHECK(pool->used() == 0);
}

TEST(radix_rejects_bad_insert) {
  auto pool = std::make_shared<BlockPool>(8, 2);
  RadixCache cache(pool);
  const std::vector<int32_t> toks = {1, 2, 3, 4};
  const std::vector<int32_t> free_pages = {0, 1};
  CHECK_THROWS(std::invalid_argument, cache.insert(toks.data(), 4, free_pages.data(), 2, 0.0));
  CHECK(cache.num_entries() == 0);
  check_ok(*pool, nullptr, &cache);
}

// ---- fuzz ------------------------------------------------------------------------

int64_t g_fuzz_ops = 20000;

TEST(fuzz_many_seeds) {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    FuzzConfig cfg;
    cfg.seed = seed;
    cfg.num_ops = g_fuzz_ops;
    cfg.page_size = seed % 2 ? 4 : 3;
    try {
      const FuzzStats st = run_fuzz(cfg);
      CHECK(st.cow_copies > 0 && st.match_hits > 0 && st.out_of_pages > 0);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      ++g_failures;
    }
  }
}

TEST(attention_plan_covers_each_token_once) {
  // 3 leaves sharing 4 pages of 16, then 1 / 2 / 5 own pages (last pages 3 / 16 / 9 full).
  const std::vector<int32_t> indptr = {0, 5, 11, 20};
  const std::vector<int32_t> last = {3, 16, 9};
  AttentionWorkConfig cfg;
  cfg.leaves_per_tile = 2;
  cfg.target_items = 6;
  cfg.max_splits = 8;
  cfg.max_items = 32;
  cfg.block_n = 16;
  std::vector<int32_t> items(cfg.max_items * kItemFields, -1), splits(3, -1);
  const AttentionWork w = plan_tree_attention(indptr.data(), last.data(), 3, 4, cfg,
                                              items.data(), splits.data());
  CHECK(w.num_items > 0 && w.num_items <= cfg.max_items && w.tokens_per_item % 16 == 0);
  const std::vector<int32_t> lens = {4 * 16 + 3, 5 * 16 + 16, 8 * 16 + 9};
  for (int leaf = 0; leaf < 3; ++leaf) {
    std::vector<int> seen(lens[leaf], 0);
    std::vector<int> slots(cfg.max_splits, 0);
    for (int i = 0; i < w.num_items; ++i) {
      const int32_t* it = &items[i * kItemFields];
      if (leaf < it[0] || leaf >= it[0] + it[1]) continue;
      CHECK(it[2] == indptr[it[0]]);
      for (int t = it[3]; t < it[4]; ++t) ++seen[t];
      ++slots[it[5]];
    }
    for (int t = 0; t < lens[leaf]; ++t) CHECK(seen[t] == 1);
    for (int s = 0; s < cfg.max_splits; ++s) CHECK(slots[s] == (s < splits[leaf] ? 1 : 0));
  }
  const std::vector<int32_t> bad_last = {3, 0, 9};
  CHECK_THROWS(std::invalid_argument,
               plan_tree_attention(indptr.data(), bad_last.data(), 3, 4, cfg, items.data(),
                                   splits.data()));
  CHECK_THROWS(std::invalid_argument,  // leaf 0 has 5 pages: 5 shared would take its last
               plan_tree_attention(indptr.data(), last.data(), 3, 5, cfg, items.data(),
                                   splits.data()));
  cfg.max_items = 3;  // fewer than one item per leaf and level
  CHECK_THROWS(std::invalid_argument,
               plan_tree_attention(indptr.data(), last.data(), 3, 4, cfg, items.data(),
                                   splits.data()));
}

TEST(attention_shared_prefix_pages) {
  const std::vector<int32_t> indptr = {0, 4, 9, 12};
  const std::vector<int32_t> indices = {7, 8, 9, 1, 7, 8, 9, 2, 3, 7, 8, 4};
  CHECK(shared_prefix_pages(indptr.data(), indices.data(), 3) == 2);  // row 2 keeps its last
  CHECK(shared_prefix_pages(indptr.data(), indices.data(), 2) == 3);
  CHECK(shared_prefix_pages(indptr.data(), indices.data(), 1) == 0);
}


// ---- argument checks (issue 13) ------------------------------------------------

TEST(args_narrowing_rejects_values_that_would_wrap) {
  // 2^32 wraps to page 0 under a plain cast; the check must refuse it and
  // leave the destination untouched (all or nothing).
  const std::vector<int64_t> wide = {3, int64_t{1} << 32, 5};
  std::vector<int32_t> dst(3, -7);
  CHECK_THROWS(ArgumentRangeError,
               narrow_ints(wide.data(), 3, 0, kInt32Max, dst.data(), "f", "pages"));
  CHECK(dst == std::vector<int32_t>(3, -7));
  try {
    narrow_ints(wide.data(), 3, 0, 9, dst.data(), "append", "tokens");
  } catch (const ArgumentRangeError& e) {
    CHECK(std::string(e.what()) == "append: tokens[1] = 4294967296 is out of range [0, 9]");
  }
  const std::vector<int64_t> neg = {0, -1};
  CHECK_THROWS(ArgumentRangeError, narrow_ints(neg.data(), 2, 0, kInt32Max, dst.data(), "f", "x"));
  const std::vector<uint64_t> huge = {UINT64_MAX};  // not -1 when compared as unsigned
  CHECK_THROWS(ArgumentRangeError,
               narrow_ints(huge.data(), 1, kInt32Min, kInt32Max, dst.data(), "f", "x"));
  const std::vector<uint8_t> small = {0, 255};
  narrow_ints(small.data(), 2, 0, kInt32Max, dst.data(), "f", "x");
  CHECK(dst[0] == 0 && dst[1] == 255 && dst[2] == -7);
  CHECK(checked_int32(15, 0, 15, "f", "page") == 15);
  CHECK_THROWS(ArgumentRangeError, checked_int32(16, 0, 15, "f", "page"));
  CHECK_THROWS(std::out_of_range, checked_int32(INT64_MIN, 0, 15, "f", "page"));
}

TEST(pool_page_range_error_is_argument_range_error) {
  BlockPool pool(4, 4, 0);
  CHECK_THROWS(ArgumentRangeError, pool.refcount(4));
  CHECK_THROWS(ArgumentRangeError, pool.incref(-1));
}

TEST(pool_decref_batch_counts_repeated_pages) {
  BlockPool pool(8, 4, 0);
  std::vector<int32_t> out;
  pool.allocate_batch(2, 0, out);
  const std::vector<int32_t> bad = {1, 0, 0};  // page 0 holds one reference, not two
  CHECK_THROWS(std::invalid_argument, pool.decref_batch(bad.data(), 3));
  CHECK(pool.refcount(0) == 1 && pool.refcount(1) == 1 && pool.used() == 2);
  pool.incref(0);
  pool.decref_batch(bad.data(), 3);  // now it does
  CHECK(pool.used() == 0 && pool.free() == 8);
}

TEST(pool_drop_ref_never_throws) {
  BlockPool pool(4, 4, 0);
  const int32_t p = pool.allocate();
  pool.drop_ref(p);
  pool.drop_ref(p);    // already free: skipped
  pool.drop_ref(-1);   // out of range: skipped
  pool.drop_ref(100);
  CHECK(pool.used() == 0 && pool.free() == 4);
  check_ok(pool, nullptr, nullptr);
}

TEST(tree_destructor_survives_a_stray_decref) {
  auto pool = std::make_shared<BlockPool>(8, 4, 0);
  {
    KVTree t(pool);
    const int64_t root = t.new_sequence();
    append(t, root, seq(0, 5));
    pool->decref(pages_of(t, root)[0]);  // caller bug: the tree's reference is gone
  }  // ~KVTree must not throw (that would be std::terminate)
  CHECK(pool->used() == 0);
}

TEST(tree_fork_of_absurd_count_changes_nothing) {
  auto pool = std::make_shared<BlockPool>(8, 4, 0);
  KVTree t(pool);
  const int64_t root = t.new_sequence();
  append(t, root, seq(0, 3));
  std::vector<int64_t> out;
  CHECK_THROWS(std::invalid_argument, t.fork(root, int64_t{1} << 40, out));
  CHECK_THROWS(std::invalid_argument, t.fork(root, -1, out));
  CHECK(out.empty() && t.num_children(root) == 0 && t.num_live_nodes() == 1);
  append(t, root, {3});  // still a leaf
  t.fork(root, 3, out);
  CHECK(out.size() == 3 && t.num_children(root) == 3);
  check_ok(*pool, &t, nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) g_fuzz_ops = std::atoll(argv[1]);
  for (auto& [name, fn] : registry()) {
    const int before = g_failures;
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: unexpected exception: %s\n", name.c_str(), e.what());
      ++g_failures;
    }
    std::printf("%s %s\n", g_failures == before ? "ok  " : "FAIL", name.c_str());
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}

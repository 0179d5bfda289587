// attention_plan.cpp - see attention_plan.h.
#include "attention_plan.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace dendrite {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t shared_prefix_pages(const int32_t* indptr, const int32_t* indices, int64_t num_rows) {
  if (num_rows < 2) return 0;
  int64_t limit = INT64_MAX;
  for (int64_t r = 0; r < num_rows; ++r)
    limit = std::min<int64_t>(limit, static_cast<int64_t>(indptr[r + 1]) - indptr[r] - 1);
  const int32_t* first = indices + indptr[0];
  int64_t shared = std::max<int64_t>(limit, 0);
  for (int64_t r = 1; r < num_rows && shared > 0; ++r) {
    const int32_t* row = indices + indptr[r];
    int64_t i = 0;
    while (i < shared && row[i] == first[i]) ++i;
    shared = i;
  }
  return shared;
}

AttentionWork plan_tree_attention(const int32_t* indptr, const int32_t* last_page_len,
                                  int64_t num_leaves, int32_t shared_pages,
                                  const AttentionWorkConfig& cfg, int32_t* items,
                                  int32_t* splits) {
  if (num_leaves < 1) throw std::invalid_argument("plan_tree_attention: no leaves");
  if (cfg.page_size < 1 || cfg.leaves_per_tile < 1 || cfg.target_items < 1 ||
      cfg.max_splits < 1 || cfg.block_n < 1)
    throw std::invalid_argument("plan_tree_attention: limits must be positive");
  const int64_t page = cfg.page_size;
  const int64_t shared = static_cast<int64_t>(shared_pages) * page;
  std::vector<int64_t> own(num_leaves);
  int64_t own_total = 0, own_max = 0;
  for (int64_t l = 0; l < num_leaves; ++l) {
    const int64_t pages = indptr[l + 1] - indptr[l];
    const int64_t last = last_page_len[l];
    if (pages < 1 || last < 1 || last > page)
      throw std::invalid_argument("plan_tree_attention: leaf " + std::to_string(l) +
                                  " needs at least one page and 1..page_size tokens in its last");
    if (shared_pages < 0 || shared_pages > pages - 1)
      throw std::invalid_argument("plan_tree_attention: shared_pages=" +
                                  std::to_string(shared_pages) + " does not leave leaf " +
                                  std::to_string(l) + " its last page");
    own[l] = (pages - 1) * page + last - shared;  // >= 1: the last page is a leaf's own
    own_total += own[l];
    own_max = std::max(own_max, own[l]);
  }
  const int64_t tiles = ceil_div(num_leaves, cfg.leaves_per_tile);
  const int64_t total = (shared ? tiles * shared : 0) + own_total;
  int64_t chunk = std::max<int64_t>(cfg.block_n,
                                    ceil_div(ceil_div(total, cfg.target_items), cfg.block_n) *
                                        cfg.block_n);
  int64_t n_shared = 0;
  for (;;) {
    n_shared = ceil_div(shared, chunk);
    int64_t n_items = n_shared * tiles;
    for (int64_t l = 0; l < num_leaves; ++l) n_items += ceil_div(own[l], chunk);
    if (n_shared + ceil_div(own_max, chunk) <= cfg.max_splits && n_items <= cfg.max_items) break;
    if (chunk >= total)  // one item per leaf and level is the fewest there can be
      throw std::invalid_argument("plan_tree_attention: max_items=" +
                                  std::to_string(cfg.max_items) + " / max_splits=" +
                                  std::to_string(cfg.max_splits) + " too small for " +
                                  std::to_string(num_leaves) + " leaves");
    chunk *= 2;
  }
  int32_t* it = items;
  auto put = [&](int64_t leaf, int64_t n, int64_t page_off, int64_t start, int64_t end,
                 int64_t split) {
    it[0] = static_cast<int32_t>(leaf);
    it[1] = static_cast<int32_t>(n);
    it[2] = static_cast<int32_t>(page_off);
    it[3] = static_cast<int32_t>(start);
    it[4] = static_cast<int32_t>(end);
    it[5] = static_cast<int32_t>(split);
    it += kItemFields;
  };
  for (int64_t a = 0; a < num_leaves; a += cfg.leaves_per_tile) {
    const int64_t n = std::min<int64_t>(cfg.leaves_per_tile, num_leaves - a);
    for (int64_t c = 0; c < n_shared; ++c)
      put(a, n, indptr[a], c * chunk, std::min(shared, (c + 1) * chunk), c);
  }
  for (int64_t l = 0; l < num_leaves; ++l) {
    const int64_t end = shared + own[l];
    const int64_t n_own = ceil_div(own[l], chunk);
    for (int64_t j = 0; j < n_own; ++j) {
      const int64_t start = shared + j * chunk;
      put(l, 1, indptr[l], start, std::min(end, start + chunk), n_shared + j);
    }
    splits[l] = static_cast<int32_t>(n_shared + n_own);
  }
  return AttentionWork{static_cast<int32_t>((it - items) / kItemFields),
                       static_cast<int32_t>(chunk)};
}

}  // namespace dendrite

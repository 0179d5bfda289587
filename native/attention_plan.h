// attention_plan.h - the work list of the tree decode attention kernel.
//
// dendrite/kernels/tree_attention.py runs one decode step's attention as a
// list of items: a run of leaves and a token range of one page list, each
// owning one split slot of every leaf it covers. The leaves' shared prefix
// is cut into items over whole tiles of leaves (read once for all of them),
// each leaf's own tokens into items of that leaf alone. Planning runs on the
// host every step, so it lives here rather than in numpy (~100 us there).
#pragma once

#include <cstdint>

namespace dendrite {

struct AttentionWorkConfig {
  int32_t page_size = 16;
  int32_t leaves_per_tile = 16;  // leaves whose queries share one tile over the prefix
  int32_t target_items = 64;     // about this many items (tokens split evenly)
  int32_t max_splits = 64;       // split slots per leaf
  int32_t max_items = 256;       // capacity of the item list
  int32_t block_n = 64;          // items hold a multiple of this many tokens
};

struct AttentionWork {
  int32_t num_items = 0;
  int32_t tokens_per_item = 0;
};

// Number of int32 per item, in the order the kernel reads them: first leaf,
// leaves, page-list offset, first token, end token, split slot.
constexpr int kItemFields = 6;

// Pages every row holds before its last page, counted from the front until
// two rows differ: the longest common full-page prefix of the CSR rows
// `indices[indptr[r] : indptr[r + 1]]`. 0 for fewer than 2 rows.
int64_t shared_prefix_pages(const int32_t* indptr, const int32_t* indices, int64_t num_rows);

// Plans `num_leaves` leaves with CSR page lists (`indptr` [num_leaves + 1],
// `last_page_len` [num_leaves]) whose first `shared_pages` pages are common.
// Writes `items` (kItemFields each, at most cfg.max_items) and `splits`
// (slots used per leaf, [num_leaves]). Items hold about total tokens read /
// target_items tokens, lengthened (doubled) until every leaf fits in
// max_splits slots and the list in max_items. Throws std::invalid_argument
// on malformed tables or limits that cannot be met.
AttentionWork plan_tree_attention(const int32_t* indptr, const int32_t* last_page_len,
                                  int64_t num_leaves, int32_t shared_pages,
                                  const AttentionWorkConfig& cfg, int32_t* items,
                                  int32_t* splits);

}  // namespace dendrite

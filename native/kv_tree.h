// kv_tree.h - tree of token sequences over a shared BlockPool, O(1) fork.
//
// A node is a segment of tokens appended after its parent's last token. It
// owns (one refcount each) only the pages its own segment wrote; everything
// before `start` is read through the parent chain. Hence fork() touches no
// page refcounts and does no per-page work: a child only records its parent.
//
// A node with children is frozen (its pages are read by the children without
// refcounts); the caller continues such a sequence by forking it once more.
//
// Page layout of a node's path: the first `inherited()` pages come from the
// parent's path, then `own_pages`. If the parent's last page is only partly
// filled, a child shares it for reading until its first append, which
// allocates a private page and emits a copy-on-write instruction
// (src, dst, tokens to copy) for the device; the parent's slots are never
// written. The same rule covers a partly filled own page whose refcount is
// above one (e.g. a prefix page held by the radix cache, after truncate).
//
// Flattened path page lists are cached on parents of leaves (only those:
// memory stays O(leaves x path pages)) so export_csr() is one or two memcpys
// per sequence. A cache is built lazily on first export and dropped when the
// node stops having leaf children.
//
// Handles are int64: (generation << 32) | slot, so stale handles are detected.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "block_pool.h"

namespace dendrite {

class KVTree {
 public:
  explicit KVTree(std::shared_ptr<BlockPool> pool);
  ~KVTree();
  KVTree(const KVTree&) = delete;
  KVTree& operator=(const KVTree&) = delete;

  const std::shared_ptr<BlockPool>& pool() const { return pool_; }

  int64_t new_sequence();
  // A root whose first num_tokens tokens are already in `pages` (e.g. a radix
  // cache hit). Increfs the pages; the node owns those references.
  int64_t new_sequence_from_prefix(const int32_t* pages, int64_t num_pages, int64_t num_tokens,
                                   const int32_t* tokens, int64_t num_token_ids);

  // n children of `node`, O(1) each; appends their handles to `out`.
  void fork(int64_t node, int64_t n, std::vector<int64_t>& out);
  int64_t fork_one(int64_t node);

  // Appends counts[b] tokens to nodes[b] for every b (distinct leaves), all
  // or nothing. Writes slot_out[sum(counts)] and appends (src, dst, n) rows to
  // copies_out. Throws OutOfPages / FrozenNode / invalid_argument before any
  // change.
  void append_batch(const int64_t* nodes, const int32_t* counts, int64_t batch,
                    const int32_t* tokens, int64_t total_tokens, int32_t* slot_out,
                    std::vector<int32_t>& copies_out);
  void append(int64_t node, const int32_t* tokens, int64_t k, int32_t* slot_out,
              std::vector<int32_t>& copies_out);

  // Drops tokens from the end of a leaf's own segment.
  void truncate(int64_t node, int64_t num_tokens);
  // Overwrites the id of the last own token of each nodes[b] with tokens[b]:
  // a step launched before the previous one's tokens were read appends
  // placeholders, whose slots are already being written on the device.
  // All or nothing: every node is checked before any id changes.
  void set_last_tokens(const int64_t* nodes, const int32_t* tokens, int64_t n);

  // Drops the caller's reference. The node (and then ancestors that hold no
  // caller reference and have no other children) is freed once childless.
  void release(int64_t node);
  // Frees `node` and all its descendants regardless of caller references,
  // then collects ancestors as release() does.
  void release_subtree(int64_t node);

  bool is_valid(int64_t node) const;      // live node
  bool is_released(int64_t node) const;   // live, but caller reference dropped
  int64_t num_tokens(int64_t node) const;
  int64_t num_pages(int64_t node) const;  // pages of the whole path
  int64_t parent(int64_t node) const;     // -1 for a root
  void children(int64_t node, std::vector<int64_t>& out) const;
  int64_t num_children(int64_t node) const;
  int64_t depth(int64_t node) const;      // 0 for a root
  void tokens(int64_t node, int32_t* out) const;  // num_tokens(node) entries
  // Whole-path pages, num_pages(node) entries. Const: never builds caches.
  void pages(int64_t node, int32_t* out) const;
  int64_t num_live_nodes() const { return live_nodes_; }
  // Pages that append_batch(nodes, counts) would allocate (new + copy-on-write).
  int64_t pages_needed(const int64_t* nodes, const int32_t* counts, int64_t batch) const;
  // Pages release(node) would return to the pool right now (its own and those
  // of ancestors it would collect, counting only pages nothing else holds).
  int64_t pages_freed_by_release(int64_t node) const;

  // export_csr in two phases so the caller can allocate the output arrays:
  // prepare returns nnz (and builds missing parent caches), fill writes
  // indptr[B+1], indices[nnz], last_page_len[B].
  int64_t export_csr_prepare(const int64_t* nodes, int64_t batch);
  void export_csr_fill(const int64_t* nodes, int64_t batch, int32_t* indptr, int32_t* indices,
                       int32_t* last_page_len) const;

  // Debug: per page, the number of references held by live nodes.
  std::vector<int32_t> debug_page_refs() const;
  // Debug: structural problems (empty when consistent).
  std::vector<std::string> validate() const;
  // Debug: handles of all live nodes, and their parents' handles (-1: root).
  std::vector<int64_t> debug_live_nodes() const;
  std::vector<int64_t> debug_parents() const;

 private:
  struct Node {
    int32_t parent = -1;           // slot, -1 for a root
    uint32_t generation = 0;       // bumped when the slot is freed
    bool alive = false;
    bool ext = false;              // caller still holds the handle
    bool cache_valid = false;
    int32_t pos_in_parent = -1;    // index in parent's children (O(1) unlink)
    int32_t leaf_children = 0;     // children that have no children
    int64_t start = 0;             // tokens inherited from the parent chain
    std::vector<int32_t> tokens;   // own segment
    std::vector<int32_t> own_pages;
    std::vector<int32_t> children;
    std::vector<int32_t> flat;     // cached whole-path pages (cache_valid)
  };

  struct AppendPlan {
    int32_t slot;
    int64_t k;
    int64_t new_pages;
    bool cow;
    int32_t cow_src;
  };

  int32_t slot_of(int64_t handle) const;            // throws on stale handle
  int32_t owned_slot_of(int64_t handle) const;      // also requires ext
  int64_t handle_of(int32_t slot) const;
  int32_t new_slot();
  int32_t add_child(int32_t parent_slot);         // the O(1) fork step
  int64_t inherited(const Node& n) const;           // pages read from the parent
  int64_t path_pages(const Node& n) const;
  int32_t last_path_page(int32_t slot) const;
  void write_path(int32_t slot, int32_t* out, bool use_cache) const;
  void materialize(int32_t slot);
  void drop_cache(Node& n);
  AppendPlan plan_append(int32_t slot, int64_t k) const;
  void execute_append(const AppendPlan& p, const int32_t* tokens, const int32_t*& regular,
                      const int32_t*& cow, int32_t* slot_out, std::vector<int32_t>& copies_out);
  int32_t detach_and_free(int32_t slot);            // returns the parent slot
  void collect(int32_t slot);                       // free while unreferenced

  // Node slots are int32 (handles keep the slot in their low 32 bits).
  static constexpr int64_t kMaxSlots = 0x7fffffff;

  std::shared_ptr<BlockPool> pool_;
  int32_t page_size_;
  std::vector<Node> nodes_;
  std::vector<int32_t> free_slots_;
  int64_t live_nodes_ = 0;
  std::vector<int32_t> scratch_pages_;
  std::vector<AppendPlan> scratch_plans_;
  std::vector<uint32_t> mark_;                      // duplicate detection in batches
  uint32_t mark_epoch_ = 0;
};

}  // namespace dendrite

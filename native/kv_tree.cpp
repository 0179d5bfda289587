// kv_tree.cpp - KVTree: fork, append with copy-on-write, release, CSR export.
#include "kv_tree.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>

#include "errors.h"

namespace dendrite {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

KVTree::KVTree(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {
  if (!pool_) throw std::invalid_argument("KVTree needs a BlockPool");
  page_size_ = pool_->page_size();
}

KVTree::~KVTree() {
  // Give every page reference back so a pool outliving the tree stays exact.
  for (Node& n : nodes_)
    if (n.alive)
      for (int32_t p : n.own_pages) pool_->drop_ref(p);
}

// ---- handles ---------------------------------------------------------------

int64_t KVTree::handle_of(int32_t slot) const {
  return (static_cast<int64_t>(nodes_[static_cast<size_t>(slot)].generation) << 32) |
         static_cast<int64_t>(static_cast<uint32_t>(slot));
}

int32_t KVTree::slot_of(int64_t handle) const {
  const int64_t slot = handle & 0xffffffffLL;
  const uint64_t gen = static_cast<uint64_t>(handle) >> 32;
  if (handle < 0 || slot >= static_cast<int64_t>(nodes_.size()) ||
      !nodes_[static_cast<size_t>(slot)].alive ||
      nodes_[static_cast<size_t>(slot)].generation != gen)
    throw std::invalid_argument("invalid or freed KVTree node handle " + std::to_string(handle));
  return static_cast<int32_t>(slot);
}

int32_t KVTree::owned_slot_of(int64_t handle) const {
  const int32_t s = slot_of(handle);
  if (!nodes_[static_cast<size_t>(s)].ext)
    throw std::invalid_argument("KVTree node " + std::to_string(handle) +
                                " was released by the caller");
  return s;
}

bool KVTree::is_valid(int64_t handle) const {
  const int64_t slot = handle & 0xffffffffLL;
  return handle >= 0 && slot < static_cast<int64_t>(nodes_.size()) &&
         nodes_[static_cast<size_t>(slot)].alive &&
         nodes_[static_cast<size_t>(slot)].generation == (static_cast<uint64_t>(handle) >> 32);
}

bool KVTree::is_released(int64_t handle) const {
  return !nodes_[static_cast<size_t>(slot_of(handle))].ext;
}

int32_t KVTree::new_slot() {
  int32_t s;
  if (!free_slots_.empty()) {
    s = free_slots_.back();
    free_slots_.pop_back();
  } else {
    if (static_cast<int64_t>(nodes_.size()) >= kMaxSlots)
      throw std::length_error("KVTree: too many nodes");
    s = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
    nodes_.back().generation = 1;
  }
  Node& n = nodes_[static_cast<size_t>(s)];
  // Vectors were cleared when the slot was freed; their capacity is reused.
  n.alive = true;
  n.ext = true;
  n.cache_valid = false;
  n.parent = -1;
  n.pos_in_parent = -1;
  n.leaf_children = 0;
  n.start = 0;
  ++live_nodes_;
  return s;
}

// ---- page geometry ---------------------------------------------------------

int64_t KVTree::inherited(const Node& n) const {
  // Before its first token a child reads the parent's (maybe partial) last
  // page; after it, that partial page has been replaced by a private copy.
  return n.tokens.empty() ? ceil_div(n.start, page_size_) : n.start / page_size_;
}

int64_t KVTree::path_pages(const Node& n) const {
  return ceil_div(n.start + static_cast<int64_t>(n.tokens.size()), page_size_);
}

int32_t KVTree::last_path_page(int32_t slot) const {
  // Walk up through empty segments to the node that wrote the last page.
  while (slot >= 0) {
    const Node& n = nodes_[static_cast<size_t>(slot)];
    if (!n.own_pages.empty()) return n.own_pages.back();
    slot = n.parent;
  }
  throw std::logic_error("KVTree: sequence has no pages");
}

void KVTree::write_path(int32_t slot, int32_t* out, bool use_cache) const {
  // Each ancestor contributes own_pages[0 : m - inherited] at offset
  // `inherited`, where m is how much of its path the descendant still needs.
  int64_t m = path_pages(nodes_[static_cast<size_t>(slot)]);
  while (m > 0) {
    const Node& n = nodes_[static_cast<size_t>(slot)];
    if (use_cache && n.cache_valid) {
      std::memcpy(out, n.flat.data(), static_cast<size_t>(m) * sizeof(int32_t));
      return;
    }
    const int64_t inh = inherited(n);
    if (m > inh) {
      std::memcpy(out + inh, n.own_pages.data(), static_cast<size_t>(m - inh) * sizeof(int32_t));
      m = inh;
    }
    slot = n.parent;
    if (m > 0 && slot < 0) throw std::logic_error("KVTree: page path shorter than expected");
  }
}

void KVTree::materialize(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  n.flat.resize(static_cast<size_t>(path_pages(n)));
  write_path(slot, n.flat.data(), true);
  n.cache_valid = true;
}

void KVTree::drop_cache(Node& n) {
  if (n.cache_valid || n.flat.capacity() > 0) {
    n.cache_valid = false;
    std::vector<int32_t>().swap(n.flat);  // give the memory back
  }
}

// ---- creation ----------------------------------------------------------------

int64_t KVTree::new_sequence() { return handle_of(new_slot()); }

int64_t KVTree::new_sequence_from_prefix(const int32_t* pages, int64_t num_pages,
                                         int64_t num_tokens, const int32_t* tokens,
                                         int64_t num_token_ids) {
  if (num_tokens < 0 || num_token_ids != num_tokens)
    throw std::invalid_argument("new_sequence_from_prefix: need exactly num_tokens token ids");
  if (num_pages != ceil_div(num_tokens, page_size_))
    throw std::invalid_argument("new_sequence_from_prefix: " + std::to_string(num_tokens) +
                                " tokens need " + std::to_string(ceil_div(num_tokens, page_size_)) +
                                " pages, got " + std::to_string(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) {
    const int32_t p = pages[i];
    if (p < 0 || p >= pool_->num_pages() || pool_->refcount(p) <= 0)
      throw std::invalid_argument("new_sequence_from_prefix: page " + std::to_string(p) +
                                  " is not an allocated page");
  }
  const int32_t s = new_slot();
  Node& n = nodes_[static_cast<size_t>(s)];
  n.own_pages.assign(pages, pages + num_pages);
  n.tokens.assign(tokens, tokens + num_tokens);
  for (int64_t i = 0; i < num_pages; ++i) pool_->incref(pages[i]);
  return handle_of(s);
}

namespace {
// Room for `extra` more elements, growing geometrically (a reserve of exactly
// size + 1 on every call would make repeated forks quadratic).
template <typename T>
void reserve_extra(std::vector<T>& v, size_t extra) {
  const size_t need = v.size() + extra;
  if (need > v.capacity()) v.reserve(std::max(need, 2 * v.capacity()));
}
}  // namespace

void KVTree::fork(int64_t node, int64_t n, std::vector<int64_t>& out) {
  if (n < 0) throw std::invalid_argument("fork: n = " + std::to_string(n) + " must be >= 0");
  const int32_t ps = owned_slot_of(node);
  // All or nothing: refuse counts past the handle space and reserve every
  // vector the loop grows up front, so neither the limit nor bad_alloc can
  // strike after some children exist (their handles would be lost).
  const int64_t left = static_cast<int64_t>(free_slots_.size()) +
                       (kMaxSlots - static_cast<int64_t>(nodes_.size()));
  if (n > left)
    throw std::invalid_argument("fork: n = " + std::to_string(n) + " exceeds the " +
                                std::to_string(left) + " node handles left");
  const int64_t fresh = std::max<int64_t>(0, n - static_cast<int64_t>(free_slots_.size()));
  reserve_extra(nodes_, static_cast<size_t>(fresh));
  reserve_extra(nodes_[static_cast<size_t>(ps)].children, static_cast<size_t>(n));
  reserve_extra(out, static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(handle_of(add_child(ps)));
}

int64_t KVTree::fork_one(int64_t node) { return handle_of(add_child(owned_slot_of(node))); }

int32_t KVTree::add_child(int32_t ps) {
  {
    Node& p = nodes_[static_cast<size_t>(ps)];
    if (p.children.empty() && p.parent >= 0) {
      // `p` stops being a leaf: its parent may no longer need a flat cache.
      Node& g = nodes_[static_cast<size_t>(p.parent)];
      if (--g.leaf_children == 0) drop_cache(g);
    }
  }
  const int32_t cs = new_slot();  // may reallocate nodes_: take references after
  Node& p = nodes_[static_cast<size_t>(ps)];
  Node& c = nodes_[static_cast<size_t>(cs)];
  c.parent = ps;
  c.start = p.start + static_cast<int64_t>(p.tokens.size());
  c.pos_in_parent = static_cast<int32_t>(p.children.size());
  p.children.push_back(cs);
  ++p.leaf_children;
  return cs;
}

// ---- append ------------------------------------------------------------------

KVTree::AppendPlan KVTree::plan_append(int32_t slot, int64_t k) const {
  const Node& n = nodes_[static_cast<size_t>(slot)];
  if (!n.children.empty())
    throw FrozenNode("KVTree: node has " + std::to_string(n.children.size()) +
                     " children and is frozen; fork it once more to continue the sequence");
  AppendPlan plan{slot, k, 0, false, -1};
  const int64_t cur = n.start + static_cast<int64_t>(n.tokens.size());
  const int64_t off = cur % page_size_;
  if (k > 0 && off != 0) {
    // Writing into a partial last page: in place only if we own it alone.
    if (n.tokens.empty()) {
      plan.cow = true;
      plan.cow_src = last_path_page(n.parent);
    } else if (pool_->refcount(n.own_pages.back()) > 1) {
      plan.cow = true;
      plan.cow_src = n.own_pages.back();
    }
  }
  plan.new_pages = ceil_div(cur + k, page_size_) - ceil_div(cur, page_size_);
  return plan;
}

void KVTree::execute_append(const AppendPlan& plan, const int32_t* tokens,
                            const int32_t*& regular, const int32_t*& cow, int32_t* slot_out,
                            std::vector<int32_t>& copies_out) {
  Node& n = nodes_[static_cast<size_t>(plan.slot)];
  const int64_t cur = n.start + static_cast<int64_t>(n.tokens.size());
  int64_t off = cur % page_size_;
  if (plan.cow) {
    const int32_t dst = *cow++;
    copies_out.push_back(plan.cow_src);
    copies_out.push_back(dst);
    copies_out.push_back(static_cast<int32_t>(off));
    if (n.tokens.empty()) {
      n.own_pages.push_back(dst);
    } else {
      pool_->decref(n.own_pages.back());  // shared, so this never frees it
      n.own_pages.back() = dst;
    }
  }
  int64_t i = 0;
  if (off != 0 && plan.k > 0) {
    const int32_t base = n.own_pages.back() * page_size_;
    for (; i < plan.k && off < page_size_; ++i, ++off) slot_out[i] = base + static_cast<int32_t>(off);
  }
  for (int64_t j = 0; j < plan.new_pages; ++j) {
    const int32_t page = *regular++;
    n.own_pages.push_back(page);
    const int32_t base = page * page_size_;
    for (int32_t o = 0; o < page_size_ && i < plan.k; ++o, ++i) slot_out[i] = base + o;
  }
  n.tokens.insert(n.tokens.end(), tokens, tokens + plan.k);
}

void KVTree::append_batch(const int64_t* nodes, const int32_t* counts, int64_t batch,
                          const int32_t* tokens, int64_t total_tokens, int32_t* slot_out,
                          std::vector<int32_t>& copies_out) {
  // Phase 1: validate and plan; nothing changes, so any throw is harmless.
  if (mark_.size() < nodes_.size()) mark_.resize(nodes_.size(), 0);
  if (++mark_epoch_ == 0) {
    std::fill(mark_.begin(), mark_.end(), 0);
    mark_epoch_ = 1;
  }
  scratch_plans_.clear();
  int64_t sum = 0, need_regular = 0, need_cow = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t s = owned_slot_of(nodes[b]);
    if (mark_[static_cast<size_t>(s)] == mark_epoch_)
      throw std::invalid_argument("append_batch: node " + std::to_string(nodes[b]) +
                                  " appears twice");
    mark_[static_cast<size_t>(s)] = mark_epoch_;
    if (counts[b] < 0) throw std::invalid_argument("append_batch: negative count");
    sum += counts[b];
    scratch_plans_.push_back(plan_append(s, counts[b]));
    need_regular += scratch_plans_.back().new_pages;
    need_cow += scratch_plans_.back().cow ? 1 : 0;
  }
  if (sum != total_tokens)
    throw std::invalid_argument("append_batch: counts sum to " + std::to_string(sum) + " but " +
                                std::to_string(total_tokens) + " tokens were given");
  // Phase 2: one all-or-nothing allocation, then infallible execution.
  scratch_pages_.clear();
  pool_->allocate_batch(need_regular, need_cow, scratch_pages_);
  const int32_t* regular = scratch_pages_.data();
  const int32_t* cow = scratch_pages_.data() + need_regular;
  int64_t t = 0;
  for (const AppendPlan& plan : scratch_plans_) {
    execute_append(plan, tokens + t, regular, cow, slot_out + t, copies_out);
    t += plan.k;
  }
}

void KVTree::append(int64_t node, const int32_t* tokens, int64_t k, int32_t* slot_out,
                    std::vector<int32_t>& copies_out) {
  if (k < 0 || k > INT32_MAX) throw std::invalid_argument("append: bad token count");
  const int32_t count = static_cast<int32_t>(k);
  append_batch(&node, &count, 1, tokens, k, slot_out, copies_out);
}

void KVTree::truncate(int64_t node, int64_t num_tokens) {
  const int32_t s = owned_slot_of(node);
  Node& n = nodes_[static_cast<size_t>(s)];
  if (!n.children.empty()) throw FrozenNode("KVTree: cannot truncate a node with children");
  const int64_t cur = n.start + static_cast<int64_t>(n.tokens.size());
  if (num_tokens < n.start || num_tokens > cur)
    throw std::invalid_argument("truncate: num_tokens must be in [" + std::to_string(n.start) +
                                ", " + std::to_string(cur) + "] (own segment only)");
  const int64_t new_len = num_tokens - n.start;
  const int64_t keep =
      new_len == 0 ? 0 : ceil_div(n.start + new_len, page_size_) - n.start / page_size_;
  for (size_t i = static_cast<size_t>(keep); i < n.own_pages.size(); ++i)
    pool_->decref(n.own_pages[i]);
  n.own_pages.resize(static_cast<size_t>(keep));
  n.tokens.resize(static_cast<size_t>(new_len));
}

void KVTree::set_last_tokens(const int64_t* nodes, const int32_t* tokens, int64_t n) {
  for (int64_t b = 0; b < n; ++b) {
    const Node& nd = nodes_[static_cast<size_t>(owned_slot_of(nodes[b]))];
    if (nd.tokens.empty())
      throw std::invalid_argument("set_last_tokens: node " + std::to_string(nodes[b]) +
                                  " has no token of its own");
  }
  for (int64_t b = 0; b < n; ++b)
    nodes_[static_cast<size_t>(owned_slot_of(nodes[b]))].tokens.back() = tokens[b];
}

// ---- release -------------------------------------------------------------------

int32_t KVTree::detach_and_free(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  const int32_t ps = n.parent;
  if (ps >= 0) {
    Node& p = nodes_[static_cast<size_t>(ps)];
    // Swap-remove from the parent's child list in O(1).
    const int32_t last = p.children.back();
    p.children[static_cast<size_t>(n.pos_in_parent)] = last;
    nodes_[static_cast<size_t>(last)].pos_in_parent = n.pos_in_parent;
    p.children.pop_back();
    if (--p.leaf_children == 0) drop_cache(p);
    if (p.children.empty() && p.parent >= 0) ++nodes_[static_cast<size_t>(p.parent)].leaf_children;
  }
  for (int32_t page : n.own_pages) pool_->decref(page);
  n.own_pages.clear();
  n.tokens.clear();
  n.children.clear();
  drop_cache(n);
  n.alive = false;
  n.ext = false;
  n.parent = -1;
  if (++n.generation == 0) n.generation = 1;
  free_slots_.push_back(slot);
  --live_nodes_;
  return ps;
}

void KVTree::collect(int32_t slot) {
  while (slot >= 0) {
    const Node& n = nodes_[static_cast<size_t>(slot)];
    if (n.ext || !n.children.empty()) return;
    slot = detach_and_free(slot);
  }
}

void KVTree::release(int64_t node) {
  const int32_t s = owned_slot_of(node);
  nodes_[static_cast<size_t>(s)].ext = false;
  collect(s);
}

void KVTree::release_subtree(int64_t node) {
  const int32_t root = slot_of(node);
  // Pre-order list; reversed it frees every node after its descendants.
  std::vector<int32_t> order{root};
  for (size_t i = 0; i < order.size(); ++i) {
    Node& n = nodes_[static_cast<size_t>(order[i])];
    n.ext = false;
    order.insert(order.end(), n.children.begin(), n.children.end());
  }
  for (size_t i = order.size(); i-- > 1;) detach_and_free(order[i]);
  collect(root);
}

// ---- queries -------------------------------------------------------------------

int64_t KVTree::num_tokens(int64_t node) const {
  const Node& n = nodes_[static_cast<size_t>(slot_of(node))];
  return n.start + static_cast<int64_t>(n.tokens.size());
}

int64_t KVTree::num_pages(int64_t node) const {
  return path_pages(nodes_[static_cast<size_t>(slot_of(node))]);
}

int64_t KVTree::parent(int64_t node) const {
  const Node& n = nodes_[static_cast<size_t>(slot_of(node))];
  return n.parent < 0 ? -1 : handle_of(n.parent);
}

void KVTree::children(int64_t node, std::vector<int64_t>& out) const {
  for (int32_t c : nodes_[static_cast<size_t>(slot_of(node))].children) out.push_back(handle_of(c));
}

int64_t KVTree::num_children(int64_t node) const {
  return static_cast<int64_t>(nodes_[static_cast<size_t>(slot_of(node))].children.size());
}

int64_t KVTree::depth(int64_t node) const {
  int64_t d = 0;
  for (int32_t s = nodes_[static_cast<size_t>(slot_of(node))].parent; s >= 0;
       s = nodes_[static_cast<size_t>(s)].parent)
    ++d;
  return d;
}

void KVTree::tokens(int64_t node, int32_t* out) const {
  // Every ancestor's own segment sits at [start, start + len) of the path.
  for (int32_t s = slot_of(node); s >= 0; s = nodes_[static_cast<size_t>(s)].parent) {
    const Node& n = nodes_[static_cast<size_t>(s)];
    if (!n.tokens.empty())
      std::memcpy(out + n.start, n.tokens.data(), n.tokens.size() * sizeof(int32_t));
  }
}

void KVTree::pages(int64_t node, int32_t* out) const { write_path(slot_of(node), out, true); }

int64_t KVTree::pages_needed(const int64_t* nodes, const int32_t* counts, int64_t batch) const {
  int64_t need = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (counts[b] < 0) throw std::invalid_argument("pages_needed: negative count");
    const AppendPlan p = plan_append(owned_slot_of(nodes[b]), counts[b]);
    need += p.new_pages + (p.cow ? 1 : 0);
  }
  return need;
}

int64_t KVTree::pages_freed_by_release(int64_t node) const {
  int32_t s = owned_slot_of(node);
  if (!nodes_[static_cast<size_t>(s)].children.empty()) return 0;  // stays alive
  int64_t freed = 0;
  while (true) {
    const Node& n = nodes_[static_cast<size_t>(s)];
    for (int32_t p : n.own_pages) freed += pool_->refcount(p) == 1;
    // The parent goes too if the caller dropped it and this was its only child.
    if (n.parent < 0) break;
    const Node& p = nodes_[static_cast<size_t>(n.parent)];
    if (p.ext || p.children.size() != 1) break;
    s = n.parent;
  }
  return freed;
}

// ---- CSR export ----------------------------------------------------------------

int64_t KVTree::export_csr_prepare(const int64_t* nodes, int64_t batch) {
  int64_t nnz = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t s = slot_of(nodes[b]);
    const Node& n = nodes_[static_cast<size_t>(s)];
    nnz += path_pages(n);
    // Build the parent's cache once; later exports are memcpy(parent) +
    // memcpy(own). Roots need none: their own pages are the path.
    const int32_t ps = n.parent;
    if (ps >= 0) {
      const Node& p = nodes_[static_cast<size_t>(ps)];
      if (!p.cache_valid && p.parent >= 0 && p.leaf_children > 0) materialize(ps);
    }
  }
  if (nnz > INT32_MAX) throw std::length_error("export_csr: more than 2^31 page entries");
  return nnz;
}

void KVTree::export_csr_fill(const int64_t* nodes, int64_t batch, int32_t* indptr,
                             int32_t* indices, int32_t* last_page_len) const {
  int64_t at = 0;
  indptr[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t s = slot_of(nodes[b]);
    const Node& n = nodes_[static_cast<size_t>(s)];
    const int64_t len = n.start + static_cast<int64_t>(n.tokens.size());
    write_path(s, indices + at, true);
    at += path_pages(n);
    indptr[b + 1] = static_cast<int32_t>(at);
    last_page_len[b] = len == 0 ? 0 : static_cast<int32_t>((len - 1) % page_size_ + 1);
  }
}

// ---- debug -----------------------------------------------------------------------

std::vector<int32_t> KVTree::debug_page_refs() const {
  std::vector<int32_t> refs(static_cast<size_t>(pool_->num_pages()), 0);
  for (const Node& n : nodes_)
    if (n.alive)
      for (int32_t p : n.own_pages)
        if (p >= 0 && p < pool_->num_pages()) ++refs[static_cast<size_t>(p)];
  return refs;
}

std::vector<int64_t> KVTree::debug_live_nodes() const {
  std::vector<int64_t> out;
  for (size_t s = 0; s < nodes_.size(); ++s)
    if (nodes_[s].alive) out.push_back(handle_of(static_cast<int32_t>(s)));
  return out;
}

std::vector<int64_t> KVTree::debug_parents() const {
  std::vector<int64_t> out;
  for (const Node& n : nodes_)
    if (n.alive) out.push_back(n.parent < 0 ? -1 : handle_of(n.parent));
  return out;
}

std::vector<std::string> KVTree::validate() const {
  std::vector<std::string> err;
  auto bad = [&](size_t s, const std::string& what) {
    err.push_back("KVTree node slot " + std::to_string(s) + ": " + what);
  };
  int64_t alive = 0;
  for (size_t s = 0; s < nodes_.size(); ++s) {
    const Node& n = nodes_[s];
    if (!n.alive) continue;
    ++alive;
    if (!n.ext && n.children.empty()) bad(s, "unreferenced childless node not freed");
    // No cycles: the root must be reached within the number of live nodes.
    int64_t steps = 0;
    for (int32_t a = n.parent; a >= 0 && steps <= live_nodes_; a = nodes_[static_cast<size_t>(a)].parent)
      ++steps;
    if (steps > live_nodes_) {
      bad(s, "parent chain has a cycle");
      continue;
    }
    if (n.parent >= 0) {
      const Node& p = nodes_[static_cast<size_t>(n.parent)];
      if (!p.alive) bad(s, "parent is dead");
      if (n.pos_in_parent < 0 || static_cast<size_t>(n.pos_in_parent) >= p.children.size() ||
          p.children[static_cast<size_t>(n.pos_in_parent)] != static_cast<int32_t>(s))
        bad(s, "not at pos_in_parent in parent's children");
      if (n.start != p.start + static_cast<int64_t>(p.tokens.size()))
        bad(s, "start differs from parent's length (parent changed while frozen)");
    } else if (n.start != 0) {
      bad(s, "root with nonzero start");
    }
    int32_t leaves = 0;
    for (int32_t c : n.children) {
      if (!nodes_[static_cast<size_t>(c)].alive || nodes_[static_cast<size_t>(c)].parent != static_cast<int32_t>(s))
        bad(s, "child link broken");
      if (nodes_[static_cast<size_t>(c)].children.empty()) ++leaves;
    }
    if (leaves != n.leaf_children) bad(s, "leaf_children count wrong");
    if (static_cast<int64_t>(n.own_pages.size()) != path_pages(n) - inherited(n))
      bad(s, "own page count does not match segment length");
    for (int32_t p : n.own_pages)
      if (p < 0 || p >= pool_->num_pages() || pool_->refcount(p) <= 0)
        bad(s, "holds invalid or free page " + std::to_string(p));
    if (n.cache_valid) {
      if (n.leaf_children == 0) bad(s, "flat cache kept without leaf children");
      std::vector<int32_t> walk(static_cast<size_t>(path_pages(n)));
      write_path(static_cast<int32_t>(s), walk.data(), false);
      if (walk != n.flat) bad(s, "flat page cache differs from the parent-chain walk");
    }
  }
  if (alive != live_nodes_) err.push_back("KVTree: live node count mismatch");
  return err;
}

}  // namespace dendrite

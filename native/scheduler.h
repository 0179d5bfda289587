// scheduler.h - runnable leaves ordered by priority; per-step token plan.
//
// Mechanism only, the engine owns the policy: it registers runnable leaves
// with a priority (higher runs first, FIFO among equal priorities) and the
// number of prompt tokens still to prefill, asks for a step plan under a token
// budget (prefill is chunked: a leaf with P pending tokens gets
// min(P, remaining budget, chunk_size); a decoding leaf gets one token), and
// asks which leaves to preempt when the pool runs low.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kv_tree.h"

namespace dendrite {

class Scheduler {
 public:
  // tree (optional): used only by preempt_candidates, to count the pages
  // preempting a leaf would free.
  Scheduler(int64_t token_budget, int64_t chunk_size, int64_t max_batch = 0,
            std::shared_ptr<KVTree> tree = nullptr);

  void add(int64_t leaf, double priority, int64_t pending_tokens = 0);
  void remove(int64_t leaf);
  void set_priority(int64_t leaf, double priority);  // keeps its FIFO position
  void set_pending(int64_t leaf, int64_t pending_tokens);
  int64_t pending(int64_t leaf) const;
  bool contains(int64_t leaf) const { return info_.count(leaf) != 0; }
  int64_t size() const { return static_cast<int64_t>(info_.size()); }
  int64_t token_budget() const { return token_budget_; }
  int64_t chunk_size() const { return chunk_size_; }
  void set_token_budget(int64_t b);

  // The step plan; does not change state (call advance() once it ran).
  void schedule(std::vector<int64_t>& leaves, std::vector<int32_t>& counts) const;
  // Same plan over the given registered leaves only, with the caller's
  // pending counts (for engines that keep pending tokens themselves; a count
  // of 0 means decode, one token).
  void schedule_subset(const int64_t* leaves, const int32_t* pending, int64_t n,
                       std::vector<int64_t>& out_leaves, std::vector<int32_t>& counts) const;
  // Indices into leaves[0:n] in preemption order: lowest priority first,
  // newest first among equal priorities.
  void preempt_order(const int64_t* leaves, int64_t n, std::vector<int64_t>& order) const;
  // Marks counts[i] prompt tokens of leaves[i] as prefilled.
  void advance(const int64_t* leaves, const int32_t* counts, int64_t n);

  // Lowest priority first (newest first among equals) until the pages their
  // release would free at least reach pages_needed; all leaves if never.
  void preempt_candidates(int64_t pages_needed, std::vector<int64_t>& out) const;

 private:
  struct Info {
    double priority;
    uint64_t seq;
    int64_t pending;
  };
  using Key = std::tuple<double, uint64_t, int64_t>;  // (-priority, seq, leaf)
  const Info& info(int64_t leaf) const;
  // Appends (leaf, tokens) grants in `keys` order under the budget.
  template <typename Pending>
  void grant(const std::vector<Key>& keys, Pending pending, std::vector<int64_t>& out_leaves,
             std::vector<int32_t>& counts) const;

  std::shared_ptr<KVTree> tree_;
  int64_t token_budget_;
  int64_t chunk_size_;
  int64_t max_batch_;
  uint64_t next_seq_ = 0;
  std::unordered_map<int64_t, Info> info_;
  std::set<Key> order_;
};

}  // namespace dendrite

// scheduler.cpp - see scheduler.h.
#include "scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace dendrite {

Scheduler::Scheduler(int64_t token_budget, int64_t chunk_size, int64_t max_batch,
                     std::shared_ptr<KVTree> tree)
    : tree_(std::move(tree)), token_budget_(token_budget), chunk_size_(chunk_size), max_batch_(max_batch) {
  if (token_budget <= 0 || chunk_size <= 0 || max_batch < 0)
    throw std::invalid_argument("Scheduler: token_budget and chunk_size must be > 0, max_batch >= 0");
}

const Scheduler::Info& Scheduler::info(int64_t leaf) const {
  auto it = info_.find(leaf);
  if (it == info_.end()) throw std::invalid_argument("Scheduler: leaf " + std::to_string(leaf) + " not registered");
  return it->second;
}

void Scheduler::add(int64_t leaf, double priority, int64_t pending_tokens) {
  if (info_.count(leaf)) throw std::invalid_argument("Scheduler: leaf " + std::to_string(leaf) + " already registered");
  if (pending_tokens < 0) throw std::invalid_argument("Scheduler: pending_tokens must be >= 0");
  if (priority != priority) throw std::invalid_argument("Scheduler: priority is NaN");
  const uint64_t seq = next_seq_++;
  info_.emplace(leaf, Info{priority, seq, pending_tokens});
  order_.emplace(-priority, seq, leaf);
}

void Scheduler::remove(int64_t leaf) {
  const Info i = info(leaf);
  order_.erase(Key{-i.priority, i.seq, leaf});
  info_.erase(leaf);
}

void Scheduler::set_priority(int64_t leaf, double priority) {
  if (priority != priority) throw std::invalid_argument("Scheduler: priority is NaN");
  info(leaf);
  Info& i = info_[leaf];
  order_.erase(Key{-i.priority, i.seq, leaf});
  i.priority = priority;
  order_.emplace(-priority, i.seq, leaf);
}

void Scheduler::set_pending(int64_t leaf, int64_t pending_tokens) {
  if (pending_tokens < 0) throw std::invalid_argument("Scheduler: pending_tokens must be >= 0");
  info(leaf);
  info_[leaf].pending = pending_tokens;
}

int64_t Scheduler::pending(int64_t leaf) const { return info(leaf).pending; }

void Scheduler::set_token_budget(int64_t b) {
  if (b <= 0) throw std::invalid_argument("Scheduler: token_budget must be > 0");
  token_budget_ = b;
}

template <typename Pending>
void Scheduler::grant(const std::vector<Key>& keys, Pending pending,
                      std::vector<int64_t>& out_leaves, std::vector<int32_t>& counts) const {
  int64_t left = token_budget_;
  for (const Key& k : keys) {
    if (left <= 0 || (max_batch_ > 0 && static_cast<int64_t>(out_leaves.size()) >= max_batch_)) break;
    const int64_t leaf = std::get<2>(k);
    const int64_t p = pending(leaf);
    const int64_t want = p > 0 ? std::min(p, chunk_size_) : 1;  // decode: one token
    const int64_t n = std::min(want, left);
    out_leaves.push_back(leaf);
    counts.push_back(static_cast<int32_t>(n));
    left -= n;
  }
}

void Scheduler::schedule(std::vector<int64_t>& leaves, std::vector<int32_t>& counts) const {
  // order_ is already sorted; copying the keys keeps grant() shared.
  const std::vector<Key> keys(order_.begin(), order_.end());
  grant(keys, [this](int64_t leaf) { return info_.at(leaf).pending; }, leaves, counts);
}

void Scheduler::schedule_subset(const int64_t* leaves, const int32_t* pending, int64_t n,
                                std::vector<int64_t>& out_leaves,
                                std::vector<int32_t>& counts) const {
  std::vector<Key> keys;
  std::unordered_map<int64_t, int64_t> given;
  keys.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const Info& in = info(leaves[i]);
    if (pending[i] < 0) throw std::invalid_argument("Scheduler: negative pending count");
    if (!given.emplace(leaves[i], pending[i]).second)
      throw std::invalid_argument("Scheduler: leaf " + std::to_string(leaves[i]) + " given twice");
    keys.emplace_back(-in.priority, in.seq, leaves[i]);
  }
  std::sort(keys.begin(), keys.end());
  grant(keys, [&given](int64_t leaf) { return given.at(leaf); }, out_leaves, counts);
}

void Scheduler::preempt_order(const int64_t* leaves, int64_t n, std::vector<int64_t>& order) const {
  std::vector<std::pair<Key, int64_t>> keyed;
  keyed.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const Info& in = info(leaves[i]);
    keyed.emplace_back(Key{-in.priority, in.seq, leaves[i]}, i);
  }
  // Reverse run order: lowest priority, then most recently added, first.
  std::sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return b.first < a.first; });
  for (const auto& k : keyed) order.push_back(k.second);
}

void Scheduler::advance(const int64_t* leaves, const int32_t* counts, int64_t n) {
  for (int64_t i = 0; i < n; ++i) info(leaves[i]);  // validate first: all or nothing
  for (int64_t i = 0; i < n; ++i) {
    Info& in = info_[leaves[i]];
    in.pending = std::max<int64_t>(0, in.pending - counts[i]);
  }
}

void Scheduler::preempt_candidates(int64_t pages_needed, std::vector<int64_t>& out) const {
  if (!tree_) throw std::logic_error("Scheduler.preempt_candidates needs the tree (pass tree=)");
  int64_t freed = 0;
  for (auto it = order_.rbegin(); it != order_.rend() && freed < pages_needed; ++it) {
    const int64_t leaf = std::get<2>(*it);
    out.push_back(leaf);
    if (tree_->is_valid(leaf) && !tree_->is_released(leaf)) freed += tree_->pages_freed_by_release(leaf);
  }
}

}  // namespace dendrite

// bench.cpp - see bench.h.
#include "bench.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <vector>

namespace dendrite {

double bench_fork_ns(KVTree& tree, int64_t node, int64_t iters, int64_t rounds) {
  if (iters <= 0 || rounds <= 0) throw std::invalid_argument("bench_fork_ns: iters, rounds > 0");
  std::vector<int64_t> kids;
  kids.reserve(static_cast<size_t>(iters));
  std::vector<double> per_fork;
  for (int64_t r = 0; r < rounds; ++r) {
    kids.clear();
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) kids.push_back(tree.fork_one(node));
    const auto t1 = std::chrono::steady_clock::now();
    per_fork.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() /
                       static_cast<double>(iters));
    for (int64_t k : kids) tree.release(k);
  }
  std::nth_element(per_fork.begin(), per_fork.begin() + static_cast<long>(per_fork.size() / 2),
                   per_fork.end());
  return per_fork[per_fork.size() / 2];
}

}  // namespace dendrite

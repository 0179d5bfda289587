// bench.h - native timing helpers, so benchmarks can report the cost of an
// operation without the Python call overhead.
#pragma once

#include <cstdint>

#include "kv_tree.h"

namespace dendrite {

// Median over `rounds` of the mean steady_clock time of `iters` single-child
// forks of `node`, in nanoseconds. The children are released between rounds
// (untimed), so the tree is left as it was.
double bench_fork_ns(KVTree& tree, int64_t node, int64_t iters, int64_t rounds);

}  // namespace dendrite

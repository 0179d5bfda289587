// bindings.cpp - pybind11 module dendrite._native over the native core.
//
// Only conversion lives here: numpy arrays in (int32/int64, C-contiguous,
// converted if needed), numpy arrays out, filled by the core without
// per-element Python work. Typed docs live in dendrite/kv.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention_plan.h"
#include "bench.h"
#include "block_pool.h"
#include "errors.h"
#include "fuzz.h"
#include "invariants.h"
#include "kv_tree.h"
#include "radix_cache.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace dendrite;

namespace {

using I32In = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using I64In = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

const int32_t* ptr(const I32In& a) { return a.size() ? a.data() : nullptr; }
const int64_t* ptr(const I64In& a) { return a.size() ? a.data() : nullptr; }

void require_1d(const py::array& a, const char* what) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be a 1-D array");
}

double monotonic_now() {
  // Same clock as Python's time.monotonic() on Linux (CLOCK_MONOTONIC).
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct AppendResult {
  py::array_t<int32_t> slot_mapping;
  py::array_t<int32_t> copies;
};

AppendResult make_append_result(py::array_t<int32_t> slots, const std::vector<int32_t>& copies) {
  py::array_t<int32_t> c({static_cast<py::ssize_t>(copies.size() / 3), static_cast<py::ssize_t>(3)});
  if (!copies.empty()) std::memcpy(c.mutable_data(), copies.data(), copies.size() * sizeof(int32_t));
  return AppendResult{std::move(slots), std::move(c)};
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Dendrite native core: BlockPool, KVTree, RadixCache, Scheduler (see dendrite.kv)";

  py::register_exception<OutOfPages>(m, "OutOfPages", PyExc_RuntimeError);
  py::register_exception<FrozenNode>(m, "FrozenNode", PyExc_ValueError);

  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool")
      .def(py::init<int32_t, int32_t, int32_t>(), py::arg("num_pages"), py::arg("page_size") = 16,
           py::arg("cow_headroom") = 0)
      .def_property_readonly("num_pages", &BlockPool::num_pages)
      .def_property_readonly("page_size", &BlockPool::page_size)
      .def_property_readonly("cow_headroom", &BlockPool::cow_headroom)
      .def_property_readonly("used", &BlockPool::used)
      .def_property_readonly("free", &BlockPool::free)
      .def_property_readonly("high_watermark", &BlockPool::high_watermark)
      .def("reset_high_watermark", &BlockPool::reset_high_watermark)
      .def("can_allocate", &BlockPool::can_allocate, py::arg("n"), py::arg("cow") = 0)
      .def("allocate", &BlockPool::allocate)
      .def(
          "allocate_batch",
          [](BlockPool& p, int64_t n, bool for_cow) {
            std::vector<int32_t> out;
            p.allocate_batch(for_cow ? 0 : n, for_cow ? n : 0, out);
            return to_numpy(out);
          },
          py::arg("n"), py::arg("for_cow") = false)
      .def("incref", &BlockPool::incref, py::arg("page"))
      .def("decref", &BlockPool::decref, py::arg("page"))
      .def(
          "decref_batch",
          [](BlockPool& p, const I32In& pages) {
            require_1d(pages, "pages");
            p.decref_batch(ptr(pages), pages.size());
          },
          py::arg("pages"))
      .def("refcount", &BlockPool::refcount, py::arg("page"))
      .def("debug_refcounts", [](const BlockPool& p) { return to_numpy(p.debug_refcounts()); })
      .def("debug_free_list", [](const BlockPool& p) { return to_numpy(p.debug_free_list()); });

  py::class_<AppendResult>(m, "AppendResult")
      .def_readonly("slot_mapping", &AppendResult::slot_mapping)
      .def_readonly("copies", &AppendResult::copies)
      // Unpacks as `slot_mapping, copies = tree.append(...)`.
      .def("__iter__",
           [](const AppendResult& r) { return py::iter(py::make_tuple(r.slot_mapping, r.copies)); })
      .def("__len__", [](const AppendResult&) { return 2; })
      .def("__repr__", [](const AppendResult& r) {
        return "AppendResult(slot_mapping=" + py::repr(r.slot_mapping).cast<std::string>() +
               ", copies=" + py::repr(r.copies).cast<std::string>() + ")";
      });

  py::class_<KVTree, std::shared_ptr<KVTree>>(m, "KVTree")
      .def(py::init<std::shared_ptr<BlockPool>>(), py::arg("pool"))
      .def_property_readonly("pool", &KVTree::pool)
      .def_property_readonly("num_live_nodes", &KVTree::num_live_nodes)
      .def("new_sequence", &KVTree::new_sequence)
      .def(
          "new_sequence_from_prefix",
          [](KVTree& t, const I32In& pages, int64_t num_tokens, const I32In& tokens) {
            require_1d(pages, "pages");
            require_1d(tokens, "tokens");
            return t.new_sequence_from_prefix(ptr(pages), pages.size(), num_tokens, ptr(tokens),
                                              tokens.size());
          },
          py::arg("pages"), py::arg("num_tokens"), py::arg("tokens"))
      .def(
          "fork",
          [](KVTree& t, int64_t node, int64_t n) {
            std::vector<int64_t> out;
            t.fork(node, n, out);
            py::list l(out.size());
            for (size_t i = 0; i < out.size(); ++i) l[i] = py::int_(out[i]);
            return l;
          },
          py::arg("node"), py::arg("n") = 1)
      .def("fork_one", &KVTree::fork_one, py::arg("node"))
      .def(
          "append",
          [](KVTree& t, int64_t node, const I32In& tokens) {
            require_1d(tokens, "tokens");
            py::array_t<int32_t> slots(tokens.size());
            std::vector<int32_t> copies;
            t.append(node, ptr(tokens), tokens.size(), slots.mutable_data(), copies);
            return make_append_result(std::move(slots), copies);
          },
          py::arg("node"), py::arg("tokens"))
      .def(
          "append_batch",
          [](KVTree& t, const I64In& nodes, const I32In& counts, const I32In& tokens) {
            require_1d(nodes, "nodes");
            require_1d(tokens, "tokens");
            require_1d(counts, "counts");
            if (nodes.size() != counts.size())
              throw std::invalid_argument("append_batch: nodes and counts differ in length");
            py::array_t<int32_t> slots(tokens.size());
            std::vector<int32_t> copies;
            t.append_batch(ptr(nodes), ptr(counts), nodes.size(), ptr(tokens), tokens.size(),
                           slots.mutable_data(), copies);
            return make_append_result(std::move(slots), copies);
          },
          py::arg("nodes"), py::arg("counts"), py::arg("tokens"))
      .def("truncate", &KVTree::truncate, py::arg("node"), py::arg("num_tokens"))
      .def(
          "set_last_tokens",
          [](KVTree& t, const I64In& nodes, const I32In& tokens) {
            require_1d(nodes, "nodes");
            require_1d(tokens, "tokens");
            if (nodes.size() != tokens.size())
              throw std::invalid_argument("set_last_tokens: nodes and tokens differ in length");
            t.set_last_tokens(ptr(nodes), ptr(tokens), nodes.size());
          },
          py::arg("nodes"), py::arg("tokens"))
      .def("release", &KVTree::release, py::arg("node"))
      .def("release_subtree", &KVTree::release_subtree, py::arg("node"))
      .def("is_valid", &KVTree::is_valid, py::arg("node"))
      .def("is_released", &KVTree::is_released, py::arg("node"))
      .def("num_tokens", &KVTree::num_tokens, py::arg("node"))
      .def("num_pages", &KVTree::num_pages, py::arg("node"))
      .def("pages_freed_by_release", &KVTree::pages_freed_by_release, py::arg("node"))
      .def(
          "pages_needed",
          [](const KVTree& t, const I64In& nodes, const I32In& counts) {
            require_1d(nodes, "nodes");
            require_1d(counts, "counts");
            if (nodes.size() != counts.size())
              throw std::invalid_argument("pages_needed: nodes and counts differ in length");
            return t.pages_needed(ptr(nodes), ptr(counts), nodes.size());
          },
          py::arg("nodes"), py::arg("counts"))
      .def("parent", &KVTree::parent, py::arg("node"))
      .def(
          "children",
          [](const KVTree& t, int64_t node) {
            std::vector<int64_t> out;
            t.children(node, out);
            return out;
          },
          py::arg("node"))
      .def("num_children", &KVTree::num_children, py::arg("node"))
      .def("depth", &KVTree::depth, py::arg("node"))
      .def(
          "tokens",
          [](const KVTree& t, int64_t node) {
            py::array_t<int32_t> a(static_cast<py::ssize_t>(t.num_tokens(node)));
            t.tokens(node, a.mutable_data());
            return a;
          },
          py::arg("node"))
      .def(
          "pages",
          [](const KVTree& t, int64_t node) {
            py::array_t<int32_t> a(static_cast<py::ssize_t>(t.num_pages(node)));
            t.pages(node, a.mutable_data());
            return a;
          },
          py::arg("node"))
      .def(
          "export_csr",
          [](KVTree& t, const I64In& leaves) {
            require_1d(leaves, "leaves");
            const int64_t b = leaves.size();
            const int64_t nnz = t.export_csr_prepare(ptr(leaves), b);
            py::array_t<int32_t> indptr(b + 1), indices(nnz), last(b);
            t.export_csr_fill(ptr(leaves), b, indptr.mutable_data(), indices.mutable_data(),
                              last.mutable_data());
            return py::make_tuple(indptr, indices, last);
          },
          py::arg("leaves"))
      .def("debug_page_refs", [](const KVTree& t) { return to_numpy(t.debug_page_refs()); })
      .def("debug_live_nodes", [](const KVTree& t) { return to_numpy(t.debug_live_nodes()); })
      .def("debug_parents", [](const KVTree& t) { return to_numpy(t.debug_parents()); })
      .def("validate", &KVTree::validate);

  py::class_<RadixCache, std::shared_ptr<RadixCache>>(m, "RadixCache")
      .def(py::init<std::shared_ptr<BlockPool>>(), py::arg("pool"))
      .def_property_readonly("pool", &RadixCache::pool)
      .def_property_readonly("num_entries", &RadixCache::num_entries)
      .def_property_readonly("num_pinned", &RadixCache::num_pinned)
      .def_property_readonly("num_evictable", &RadixCache::num_evictable)
      .def(
          "match_prefix",
          [](RadixCache& c, const I32In& tokens, py::object now, bool pin) {
            require_1d(tokens, "tokens");
            std::vector<int32_t> pages;
            const double t = now.is_none() ? monotonic_now() : now.cast<double>();
            const int64_t n = c.match_prefix(ptr(tokens), tokens.size(), t, pages, pin);
            return py::make_tuple(n, to_numpy(pages));
          },
          py::arg("tokens"), py::arg("now") = py::none(), py::arg("pin") = true)
      .def("unpin", &RadixCache::unpin, py::arg("last_page"))
      .def(
          "unpin",
          [](RadixCache& c, const I32In& pages) {
            require_1d(pages, "pages");
            if (pages.size() > 0) c.unpin(pages.data()[pages.size() - 1]);
          },
          py::arg("pages"))
      .def(
          "insert",
          [](RadixCache& c, const I32In& tokens, const I32In& pages, py::object now) {
            require_1d(tokens, "tokens");
            require_1d(pages, "pages");
            const double t = now.is_none() ? monotonic_now() : now.cast<double>();
            return c.insert(ptr(tokens), tokens.size(), ptr(pages), pages.size(), t);
          },
          py::arg("tokens"), py::arg("pages"), py::arg("now") = py::none())
      .def("evict", &RadixCache::evict, py::arg("num_pages"))
      .def("evict_expired", &RadixCache::evict_expired, py::arg("now"), py::arg("ttl"))
      .def("clear", &RadixCache::clear)
      .def("reset_stats", &RadixCache::reset_stats)
      .def("stats",
           [](const RadixCache& c) {
             const RadixStats& s = c.stats();
             py::dict d;
             d["queries"] = s.queries;
             d["hits"] = s.hits;
             d["hit_rate"] = s.queries ? static_cast<double>(s.hits) / static_cast<double>(s.queries) : 0.0;
             d["tokens_queried"] = s.tokens_queried;
             d["tokens_saved"] = s.tokens_matched;
             d["token_hit_rate"] = s.tokens_queried ? static_cast<double>(s.tokens_matched) /
                                                         static_cast<double>(s.tokens_queried)
                                                   : 0.0;
             d["inserted_pages"] = s.inserted_pages;
             d["evictions"] = s.evictions;
             d["pages_freed"] = s.pages_freed;
             d["entries"] = c.num_entries();
             d["pinned"] = c.num_pinned();
             return d;
           })
      .def("debug_page_refs", [](const RadixCache& c) { return to_numpy(c.debug_page_refs()); })
      .def("validate", &RadixCache::validate);

  py::class_<Scheduler, std::shared_ptr<Scheduler>>(m, "Scheduler")
      .def(py::init<int64_t, int64_t, int64_t, std::shared_ptr<KVTree>>(), py::arg("token_budget"),
           py::arg("chunk_size") = 512, py::arg("max_batch") = 0, py::arg("tree") = nullptr)
      .def("add", &Scheduler::add, py::arg("leaf"), py::arg("priority") = 0.0,
           py::arg("pending_tokens") = 0)
      .def("remove", &Scheduler::remove, py::arg("leaf"))
      .def("set_priority", &Scheduler::set_priority, py::arg("leaf"), py::arg("priority"))
      .def("set_pending", &Scheduler::set_pending, py::arg("leaf"), py::arg("pending_tokens"))
      .def("pending", &Scheduler::pending, py::arg("leaf"))
      .def("__contains__", &Scheduler::contains)
      .def("__len__", &Scheduler::size)
      .def_property("token_budget", &Scheduler::token_budget, &Scheduler::set_token_budget)
      .def_property_readonly("chunk_size", &Scheduler::chunk_size)
      .def("schedule",
           [](const Scheduler& s) {
             std::vector<int64_t> leaves;
             std::vector<int32_t> counts;
             s.schedule(leaves, counts);
             return py::make_tuple(to_numpy(leaves), to_numpy(counts));
           })
      .def(
          "schedule",
          [](const Scheduler& s, const I64In& leaves, const I32In& pending) {
            require_1d(leaves, "leaves");
            require_1d(pending, "pending");
            if (leaves.size() != pending.size())
              throw std::invalid_argument("schedule: leaves and pending differ in length");
            std::vector<int64_t> out;
            std::vector<int32_t> counts;
            s.schedule_subset(ptr(leaves), ptr(pending), leaves.size(), out, counts);
            return py::make_tuple(to_numpy(out), to_numpy(counts));
          },
          py::arg("leaves"), py::arg("pending"))
      .def(
          "preempt_order",
          [](const Scheduler& s, const I64In& leaves) {
            require_1d(leaves, "leaves");
            std::vector<int64_t> order;
            s.preempt_order(ptr(leaves), leaves.size(), order);
            return to_numpy(order);
          },
          py::arg("leaves"))
      .def(
          "advance",
          [](Scheduler& s, const I64In& leaves, const I32In& counts) {
            require_1d(leaves, "leaves");
            require_1d(counts, "counts");
            if (leaves.size() != counts.size())
              throw std::invalid_argument("advance: leaves and counts differ in length");
            s.advance(ptr(leaves), ptr(counts), leaves.size());
          },
          py::arg("leaves"), py::arg("counts"))
      .def(
          "preempt_candidates",
          [](const Scheduler& s, int64_t pages_needed) {
            std::vector<int64_t> out;
            s.preempt_candidates(pages_needed, out);
            return to_numpy(out);
          },
          py::arg("pages_needed"));

  m.def(
      "check_invariants",
      [](const std::shared_ptr<BlockPool>& pool, const std::vector<std::shared_ptr<KVTree>>& trees,
         const std::vector<std::shared_ptr<RadixCache>>& caches) {
        std::vector<const KVTree*> t;
        std::vector<const RadixCache*> c;
        for (auto& x : trees) t.push_back(x.get());
        for (auto& x : caches) c.push_back(x.get());
        return check_invariants(*pool, t, c);
      },
      py::arg("pool"), py::arg("trees"), py::arg("caches"),
      "Native cross-check of refcounts, free list and structure; returns problems found.");

  m.def(
      "run_fuzz",
      [](uint64_t seed, int64_t num_ops, int32_t num_pages, int32_t page_size, int64_t check_every) {
        FuzzConfig cfg;
        cfg.seed = seed;
        cfg.num_ops = num_ops;
        cfg.num_pages = num_pages;
        cfg.page_size = page_size;
        cfg.check_every = check_every;
        FuzzStats st;
        {
          py::gil_scoped_release nogil;  // pure C++, touches no Python state
          st = run_fuzz(cfg);
        }
        py::dict d;
        d["ops"] = st.ops;
        d["forks"] = st.forks;
        d["appends"] = st.appends;
        d["batch_appends"] = st.batch_appends;
        d["truncates"] = st.truncates;
        d["releases"] = st.releases;
        d["subtree_releases"] = st.subtree_releases;
        d["matches"] = st.matches;
        d["match_hits"] = st.match_hits;
        d["inserts"] = st.inserts;
        d["evicted_pages"] = st.evicted_pages;
        d["out_of_pages"] = st.out_of_pages;
        d["frozen_errors"] = st.frozen_errors;
        d["cow_copies"] = st.cow_copies;
        d["checks"] = st.checks;
        d["max_live_nodes"] = st.max_live_nodes;
        return d;
      },
      py::arg("seed"), py::arg("num_ops"), py::arg("num_pages") = 96, py::arg("page_size") = 4,
      py::arg("check_every") = 64,
      "Random ops over pool/tree/cache with invariant and simulated-KV checks (test helper).");

  m.def(
      "shared_prefix_pages",
      [](const I32In& indptr, const I32In& indices) {
        require_1d(indptr, "indptr");
        require_1d(indices, "indices");
        const int64_t rows = std::max<int64_t>(indptr.size() - 1, 0);
        if (rows > 0 && (indptr.data()[0] < 0 || indptr.data()[rows] > indices.size()))
          throw std::invalid_argument("shared_prefix_pages: indptr points outside indices");
        for (int64_t r = 0; r < rows; ++r)
          if (indptr.data()[r + 1] < indptr.data()[r])
            throw std::invalid_argument("shared_prefix_pages: indptr must not decrease");
        return shared_prefix_pages(indptr.data(), ptr(indices), rows);
      },
      py::arg("indptr"), py::arg("indices"),
      "Longest common full-page prefix of the CSR rows (each row keeps its last page).");

  m.def(
      "plan_tree_attention",
      [](const I32In& indptr, const I32In& last_page_len, int32_t shared_pages, int32_t page_size,
         int32_t leaves_per_tile, int32_t target_items, int32_t max_splits, int32_t max_items,
         int32_t block_n, py::array_t<int32_t> items_out, py::array_t<int32_t> splits_out) {
        require_1d(indptr, "indptr");
        require_1d(last_page_len, "last_page_len");
        const int64_t b = last_page_len.size();
        if (indptr.size() != b + 1)
          throw std::invalid_argument("plan_tree_attention: indptr must have one more entry "
                                      "than last_page_len");
        auto writable = [](py::array_t<int32_t>& a, int64_t need, const char* what) {
          if (!a.writeable() || !(a.flags() & py::array::c_style) || a.size() < need)
            throw std::invalid_argument(std::string("plan_tree_attention: ") + what +
                                        " must be a writable C-contiguous int32 array of at "
                                        "least " + std::to_string(need) + " entries");
          return a.mutable_data();
        };
        AttentionWorkConfig cfg;
        cfg.page_size = page_size;
        cfg.leaves_per_tile = leaves_per_tile;
        cfg.target_items = target_items;
        cfg.max_splits = max_splits;
        cfg.max_items = max_items;
        cfg.block_n = block_n;
        int32_t* items = writable(items_out, static_cast<int64_t>(max_items) * kItemFields,
                                  "items_out");
        int32_t* splits = writable(splits_out, b, "splits_out");
        AttentionWork w = plan_tree_attention(indptr.data(), last_page_len.data(), b,
                                              shared_pages, cfg, items, splits);
        return py::make_tuple(w.num_items, w.tokens_per_item);
      },
      py::arg("indptr"), py::arg("last_page_len"), py::arg("shared_pages"), py::arg("page_size"),
      py::arg("leaves_per_tile"), py::arg("target_items"), py::arg("max_splits"),
      py::arg("max_items"), py::arg("block_n"), py::arg("items_out"), py::arg("splits_out"),
      "Tree-attention work list into items_out (6 int32 per item) and splits_out; returns "
      "(num_items, tokens_per_item). See dendrite/kernels/tree_attention.py.");

  m.def("bench_fork_ns", &bench_fork_ns, py::arg("tree"), py::arg("node"), py::arg("iters") = 10000,
        py::arg("rounds") = 5,
        "Median ns per single-child fork of node, timed in C++ with steady_clock.");
}

// bindings.cpp - pybind11 module dendrite._native over the native core.
//
// Only conversion lives here: numpy arrays in, numpy arrays out, filled by
// the core without per-element Python work. Array arguments take any integer
// dtype (or a sequence numpy turns into one) and are narrowed to the core's
// int32/int64 with range checks (arg_checks.h): nothing is cast silently, so
// page 2**32 is an error, not page 0. Non-integer arrays are a TypeError
// naming the argument. Scalar sizes (BlockPool, Scheduler) are checked here
// too, by name, so dendrite.kv can re-export these classes as they are.
//
// The docstrings here are the reference; dendrite/_native.pyi repeats them
// with full types for type checkers (tests/native/test_native_stub.py keeps
// the two in step) and dendrite/kv.py states the rules they share.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "arg_checks.h"
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

// A scalar integer argument taken as it came, so int_arg() can name it in
// its errors (pybind11's int caster only says "incompatible arguments" and
// takes True as 1). Signatures show it as `int`.
struct IntArg {
  py::object obj;
};

}  // namespace

namespace pybind11::detail {
template <>
struct type_caster<IntArg> {
  PYBIND11_TYPE_CASTER(IntArg, const_name("int"));
  bool load(handle src, bool) {
    value.obj = reinterpret_borrow<object>(src);
    return true;
  }
  static handle cast(const IntArg& v, return_value_policy, handle) { return v.obj.inc_ref(); }
};
}  // namespace pybind11::detail

namespace {

using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

const int32_t* ptr(const I32& a) { return a.size() ? a.data() : nullptr; }
const int64_t* ptr(const I64& a) { return a.size() ? a.data() : nullptr; }

std::string where(const char* fn, const char* name) { return std::string(fn) + ": " + name; }

// `arg` as an int in [lo, hi]: any object with __index__ (int, numpy
// integers) but not bool, which is an int to Python yet always a bug here
// (BlockPool(True) is not one page). TypeError / ArgumentRangeError name
// `fn`: `name`.
int64_t int_arg(const IntArg& arg, const char* fn, const char* name, int64_t lo, int64_t hi) {
  PyObject* o = arg.obj.ptr();
  auto type_error = [&] {
    return py::type_error(where(fn, name) + " must be an int, got " +
                          std::string(py::str(py::type::handle_of(arg.obj).attr("__name__"))) +
                          " " + std::string(py::repr(arg.obj)));
  };
  if (PyBool_Check(o)) throw type_error();
  PyObject* index = PyNumber_Index(o);
  if (index == nullptr) {
    PyErr_Clear();
    throw type_error();
  }
  const py::object v = py::reinterpret_steal<py::object>(index);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || x < lo || x > hi)
    throw_out_of_range(fn, name, -1, std::string(py::str(v)), lo, hi);
  return static_cast<int64_t>(x);
}

// `obj` as a 1-D numpy array of integers (numpy's asarray rules: lists work).
// Empty arrays of any dtype pass: np.asarray([]) is float64.
py::array integer_array(py::handle obj, const char* fn, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a)
    throw py::type_error(where(fn, name) + " must be a 1-D array of integers, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  if (a.ndim() != 1)
    throw std::invalid_argument(where(fn, name) + " must be a 1-D array of integers, got " +
                                std::to_string(a.ndim()) + "-D");
  const char kind = a.dtype().kind();
  if (a.size() > 0 && kind != 'i' && kind != 'u')
    throw py::type_error(where(fn, name) + " must be a 1-D array of integers, got dtype " +
                         std::string(py::str(a.dtype())));
  return a;
}

// Calls f(typed C-contiguous array) for the integer dtype of `a`.
template <typename F>
void visit_ints(const py::array& a, F&& f) {
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    f(py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a));
  };
  if (kind == 'i') {
    if (size == 1) return go(int8_t{});
    if (size == 2) return go(int16_t{});
    if (size == 4) return go(int32_t{});
    return go(int64_t{});
  }
  if (size == 1) return go(uint8_t{});
  if (size == 2) return go(uint16_t{});
  if (size == 4) return go(uint32_t{});
  return go(uint64_t{});
}

// Integer array argument as C-contiguous int32 with every value in [lo, hi]
// (no copy when it already is one); ArgumentRangeError names the bad entry.
I32 int32_arg(py::handle obj, const char* fn, const char* name, int64_t lo = 0,
              int64_t hi = kInt32Max) {
  py::array a = integer_array(obj, fn, name);
  if (a.size() == 0) return I32(0);
  I32 out;
  visit_ints(a, [&](auto typed) {
    using T = typename decltype(typed)::value_type;
    if constexpr (std::is_same<T, int32_t>::value) {
      check_int_range(typed.data(), typed.size(), lo, hi, fn, name);
      out = std::move(typed);
    } else {
      I32 conv(typed.size());
      narrow_ints(typed.data(), typed.size(), lo, hi, conv.mutable_data(), fn, name);
      out = std::move(conv);
    }
  });
  return out;
}

// Integer array argument as C-contiguous int64 (node handles: the core
// checks that they are live; only uint64 above INT64_MAX is out of range).
I64 int64_arg(py::handle obj, const char* fn, const char* name) {
  py::array a = integer_array(obj, fn, name);
  if (a.size() == 0) return I64(0);
  I64 out;
  visit_ints(a, [&](auto typed) {
    using T = typename decltype(typed)::value_type;
    if constexpr (std::is_same<T, int64_t>::value) {
      out = std::move(typed);
    } else {
      I64 conv(typed.size());
      narrow_ints(typed.data(), typed.size(), kInt64Min, kInt64Max, conv.mutable_data(), fn,
                  name);
      out = std::move(conv);
    }
  });
  return out;
}

void require_same_length(int64_t a, int64_t b, const char* fn, const char* na, const char* nb) {
  if (a != b)
    throw std::invalid_argument(std::string(fn) + ": " + na + " and " + nb +
                                " differ in length (" + std::to_string(a) + " vs " +
                                std::to_string(b) + ")");
}

// Highest valid page id of `pool` (for range checks of page arguments).
int64_t last_page(const BlockPool& pool) { return static_cast<int64_t>(pool.num_pages()) - 1; }

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
  m.doc() =
      "Dendrite native core: the paged KV cache bookkeeping (BlockPool, KVTree, RadixCache,\n"
      "Scheduler) and host-side helpers. Import it as dendrite.kv, which documents the\n"
      "refcount scheme and the argument rules; dendrite/_native.pyi has the types.";

  // Exception docstrings go on the type: register_exception has no doc argument.
  py::register_exception<OutOfPages>(m, "OutOfPages", PyExc_RuntimeError)
      .attr("__doc__") =
      "The pool cannot satisfy an allocation; nothing was changed (all-or-nothing), so the\n"
      "caller may evict or preempt and retry. Subclass of RuntimeError.";
  py::register_exception<FrozenNode>(m, "FrozenNode", PyExc_ValueError).attr("__doc__") =
      "Appending to / truncating a node that has children: its pages are shared read-only.\n"
      "Fork it once more to continue it. Subclass of ValueError.";
  // Both: a bad value (ValueError) and, for page ids, a bad index (IndexError).
  py::register_exception<ArgumentRangeError>(
      m, "ArgumentRangeError",
      py::make_tuple(py::handle(PyExc_ValueError), py::handle(PyExc_IndexError)))
      .attr("__doc__") =
      "An integer argument out of its range (page id >= num_pages, negative token id or\n"
      "count, a value past int32), raised before anything changed. Subclass of ValueError\n"
      "and IndexError.";

  py::class_<BlockPool, std::shared_ptr<BlockPool>>(
      m, "BlockPool",
      "Fixed set of `num_pages` KV pages of `page_size` tokens, refcounted.\n\n"
      "Page ids are int32 in [0, num_pages); the slot of offset `o` in page `p` is\n"
      "`p * page_size + o`. `cow_headroom` pages are reserved for copy-on-write copies so\n"
      "forked children can always make their first write.\n\n"
      "`num_pages` >= 1 and `page_size` >= 1 with `num_pages * page_size` < 2**31 (slots are\n"
      "int32), `cow_headroom` in [0, num_pages]; all ints, not bool (TypeError otherwise,\n"
      "ValueError when out of range, each naming the argument).")
      .def(py::init([](const IntArg& num_pages, const IntArg& page_size,
                       const IntArg& cow_headroom) {
             const char* fn = "BlockPool";
             const int64_t n = int_arg(num_pages, fn, "num_pages", 1, kInt32Max);
             const int64_t ps = int_arg(page_size, fn, "page_size", 1, kInt32Max);
             const int64_t h = int_arg(cow_headroom, fn, "cow_headroom", 0, n);
             // The core checks num_pages * page_size < 2**31 (slots are int32).
             return std::make_shared<BlockPool>(static_cast<int32_t>(n), static_cast<int32_t>(ps),
                                                static_cast<int32_t>(h));
           }),
           py::arg("num_pages"), py::arg("page_size") = 16, py::arg("cow_headroom") = 0)
      .def_property_readonly("num_pages", &BlockPool::num_pages, "Pages in the pool.")
      .def_property_readonly("page_size", &BlockPool::page_size, "Tokens per page.")
      .def_property_readonly("cow_headroom", &BlockPool::cow_headroom,
                             "Pages only copy-on-write allocations may take.")
      .def_property_readonly("used", &BlockPool::used, "Pages with a nonzero refcount.")
      .def_property_readonly("free", &BlockPool::free,
                             "Pages on the free list (headroom included).")
      .def_property_readonly("high_watermark", &BlockPool::high_watermark,
                             "Most pages ever used at once (since construction or the last "
                             "reset).")
      .def("reset_high_watermark", &BlockPool::reset_high_watermark,
           "Restart `high_watermark` from the pages used now.")
      .def("can_allocate", &BlockPool::can_allocate, py::arg("n"), py::arg("cow") = 0,
           "Whether `n` ordinary plus `cow` copy-on-write pages fit right now.")
      .def("allocate", &BlockPool::allocate,
           "One page with refcount 1. Raises OutOfPages (pool unchanged).")
      .def(
          "allocate_batch",
          [](BlockPool& p, int64_t n, bool for_cow) {
            if (n < 0)
              throw std::invalid_argument("allocate_batch: n = " + std::to_string(n) +
                                          " must be >= 0");
            std::vector<int32_t> out;
            p.allocate_batch(for_cow ? 0 : n, for_cow ? n : 0, out);
            return to_numpy(out);
          },
          py::arg("n"), py::arg("for_cow") = false,
          "`n` pages (int32 [n]) with refcount 1, all or nothing. `for_cow` may use the "
          "headroom.")
      .def(
          "incref",
          [](BlockPool& p, int64_t page) {
            p.incref(checked_int32(page, 0, last_page(p), "incref", "page"));
          },
          py::arg("page"), "Add one reference to an allocated page.")
      .def(
          "decref",
          [](BlockPool& p, int64_t page) {
            return p.decref(checked_int32(page, 0, last_page(p), "decref", "page"));
          },
          py::arg("page"), "Drop one reference; True when the page went back to the free list.")
      .def(
          "decref_batch",
          [](BlockPool& p, py::handle pages) {
            const I32 pg = int32_arg(pages, "decref_batch", "pages", 0, last_page(p));
            p.decref_batch(ptr(pg), pg.size());
          },
          py::arg("pages"),
          "Drop one reference per occurrence of each page, all or nothing (a page listed k "
          "times needs k references).")
      .def(
          "refcount",
          [](const BlockPool& p, int64_t page) {
            return p.refcount(checked_int32(page, 0, last_page(p), "refcount", "page"));
          },
          py::arg("page"), "References held on `page` (0: free).")
      .def(
          "debug_refcounts", [](const BlockPool& p) { return to_numpy(p.debug_refcounts()); },
          "Copy of every page's refcount (int32 [num_pages]).")
      .def(
          "debug_free_list", [](const BlockPool& p) { return to_numpy(p.debug_free_list()); },
          "Copy of the free list (int32, top of the stack last).")
      .def("debug_trees", &BlockPool::live_trees,
           "The live KVTrees built on this pool, oldest first (for check_invariants).")
      .def("debug_caches", &BlockPool::live_caches,
           "The live RadixCaches built on this pool, oldest first (for check_invariants).")
      .def("__repr__", [](const BlockPool& p) {
        return "BlockPool(num_pages=" + std::to_string(p.num_pages()) +
               ", page_size=" + std::to_string(p.page_size()) +
               ", used=" + std::to_string(p.used()) + ", free=" + std::to_string(p.free()) +
               ", high_watermark=" + std::to_string(p.high_watermark()) + ")";
      });

  py::class_<AppendResult>(
      m, "AppendResult",
      "Result of `KVTree.append`/`append_batch`: `slot_mapping` int32 [T] (where each new\n"
      "token's K/V goes: page * page_size + offset) and `copies` int32 [m, 3] rows\n"
      "(src_page, dst_page, num_tokens) to execute on the device *before* writing this\n"
      "step's K/V. Unpacks as `slots, copies = result`.")
      .def_readonly("slot_mapping", &AppendResult::slot_mapping,
                    "int32 [T]: the slot of each appended token, in order.")
      .def_readonly("copies", &AppendResult::copies,
                    "int32 [m, 3]: copy-on-write rows (src_page, dst_page, num_tokens).")
      .def(
          "__iter__",
          [](const AppendResult& r) { return py::iter(py::make_tuple(r.slot_mapping, r.copies)); },
          "Yields `slot_mapping`, then `copies`.")
      .def("__len__", [](const AppendResult&) { return 2; }, "2: it unpacks as a pair.")
      .def("__repr__", [](const AppendResult& r) {
        return "AppendResult(slot_mapping=" + py::repr(r.slot_mapping).cast<std::string>() +
               ", copies=" + py::repr(r.copies).cast<std::string>() + ")";
      });

  py::class_<KVTree, std::shared_ptr<KVTree>>(
      m, "KVTree",
      "Token sequences as a tree over a `BlockPool`, with O(1) copy-on-write fork.\n\n"
      "A node is a segment of tokens after its parent's; it owns only the pages its segment\n"
      "wrote. `fork` creates children that read the parent's pages without touching any\n"
      "refcount. A node with children is frozen (`append` raises `FrozenNode`): continue it\n"
      "by forking it once more. A child's first write into the parent's partly filled last\n"
      "page allocates a private page and returns a copy instruction; the parent's slots are\n"
      "never written. Node handles are ints; the tree keeps its pool alive.")
      .def(py::init([](const std::shared_ptr<BlockPool>& pool) {
             auto tree = std::make_shared<KVTree>(pool);
             pool->add_user(tree);  // so check_invariants(pool) finds it
             return tree;
           }),
           // keep_alive: `tree.pool` stays the very object passed in (the
           // shared_ptr alone would keep the pool, not its Python wrapper).
           py::arg("pool").none(false), py::keep_alive<1, 2>())
      .def_property_readonly("pool", &KVTree::pool, "The pool this tree takes pages from.")
      .def_property_readonly("num_live_nodes", &KVTree::num_live_nodes,
                             "Live nodes (released interior nodes included).")
      .def("new_sequence", &KVTree::new_sequence, "An empty root sequence.")
      .def(
          "new_sequence_from_prefix",
          [](KVTree& t, py::handle pages, int64_t num_tokens, py::handle tokens) {
            const char* fn = "new_sequence_from_prefix";
            const I32 pg = int32_arg(pages, fn, "pages", 0, last_page(*t.pool()));
            const I32 tk = int32_arg(tokens, fn, "tokens");
            return t.new_sequence_from_prefix(ptr(pg), pg.size(), num_tokens, ptr(tk), tk.size());
          },
          py::arg("pages"), py::arg("num_tokens"), py::arg("tokens"),
          "A root whose first `num_tokens` tokens (`tokens`) are already in `pages`.\n\n"
          "Typically a `RadixCache.match_prefix` hit. Increfs the pages (the node owns those\n"
          "references); `len(pages)` must be `ceil(num_tokens / page_size)`.")
      .def(
          "fork",
          [](KVTree& t, int64_t node, int64_t n) {
            std::vector<int64_t> out;
            t.fork(node, n, out);
            py::list l(out.size());
            for (size_t i = 0; i < out.size(); ++i) l[i] = py::int_(out[i]);
            return l;
          },
          py::arg("node"), py::arg("n") = 1,
          "`n` children of `node`, O(1) each; no page refcount changes. Freezes `node`.\n\n"
          "All or nothing: `n` < 0, or more than the node handles left (2**31 - 1 per tree),\n"
          "raises ValueError before any child exists.")
      .def("fork_one", &KVTree::fork_one, py::arg("node"),
           "`fork(node, 1)[0]` without building a list.")
      .def(
          "append",
          [](KVTree& t, int64_t node, py::handle tokens) {
            const I32 tk = int32_arg(tokens, "append", "tokens");
            py::array_t<int32_t> slots(tk.size());
            std::vector<int32_t> copies;
            t.append(node, ptr(tk), tk.size(), slots.mutable_data(), copies);
            return make_append_result(std::move(slots), copies);
          },
          py::arg("node"), py::arg("tokens"),
          "Append tokens (ids in [0, 2**31 - 1]) to leaf `node`: slot mapping + copy-on-write\n"
          "copies. All or nothing: on `OutOfPages`, or a bad argument, nothing changed.")
      .def(
          "append_batch",
          [](KVTree& t, py::handle nodes, py::handle counts, py::handle tokens) {
            const char* fn = "append_batch";
            const I64 nd = int64_arg(nodes, fn, "nodes");
            const I32 ct = int32_arg(counts, fn, "counts");
            const I32 tk = int32_arg(tokens, fn, "tokens");
            require_same_length(nd.size(), ct.size(), fn, "nodes", "counts");
            py::array_t<int32_t> slots(tk.size());
            std::vector<int32_t> copies;
            t.append_batch(ptr(nd), ptr(ct), nd.size(), ptr(tk), tk.size(), slots.mutable_data(),
                           copies);
            return make_append_result(std::move(slots), copies);
          },
          py::arg("nodes"), py::arg("counts"), py::arg("tokens"),
          "Append `counts[b]` tokens (consecutive in `tokens`) to each distinct leaf\n"
          "`nodes[b]`; slot_mapping follows `tokens`. All or nothing over the batch.\n\n"
          "`len(nodes) == len(counts)`, counts >= 0 summing to `len(tokens)`, token ids in\n"
          "[0, 2**31 - 1].")
      .def("truncate", &KVTree::truncate, py::arg("node"), py::arg("num_tokens"),
           "Drop `num_tokens` tokens from the end of leaf `node`'s own segment (rollback).")
      .def(
          "set_last_tokens",
          [](KVTree& t, py::handle nodes, py::handle tokens) {
            const char* fn = "set_last_tokens";
            const I64 nd = int64_arg(nodes, fn, "nodes");
            const I32 tk = int32_arg(tokens, fn, "tokens");
            require_same_length(nd.size(), tk.size(), fn, "nodes", "tokens");
            t.set_last_tokens(ptr(nd), ptr(tk), nd.size());
          },
          py::arg("nodes"), py::arg("tokens"),
          "Set the id of each leaf's last own token (placeholders appended by a step launched\n"
          "before the previous step's tokens were read). All or nothing.")
      .def("release", &KVTree::release, py::arg("node"),
           "Drop the caller's handle. The node is freed once it has no children, and so are\n"
           "ancestors left without children and without a handle.")
      .def("release_subtree", &KVTree::release_subtree, py::arg("node"),
           "Free `node` and all its descendants (their handles become invalid).")
      .def("is_valid", &KVTree::is_valid, py::arg("node"),
           "Whether `node` is a live handle (released interior nodes are live).")
      .def("is_released", &KVTree::is_released, py::arg("node"),
           "Live, but the caller's handle was released (kept alive by children).")
      .def("num_tokens", &KVTree::num_tokens, py::arg("node"),
           "Tokens of the whole path from the root.")
      .def("num_pages", &KVTree::num_pages, py::arg("node"),
           "Pages of the whole path: ceil(num_tokens / page_size).")
      .def("pages_freed_by_release", &KVTree::pages_freed_by_release, py::arg("node"),
           "Pages `release(node)` would give back to the pool right now.")
      .def(
          "pages_needed",
          [](const KVTree& t, py::handle nodes, py::handle counts) {
            const char* fn = "pages_needed";
            const I64 nd = int64_arg(nodes, fn, "nodes");
            const I32 ct = int32_arg(counts, fn, "counts");
            require_same_length(nd.size(), ct.size(), fn, "nodes", "counts");
            return t.pages_needed(ptr(nd), ptr(ct), nd.size());
          },
          py::arg("nodes"), py::arg("counts"),
          "Pages `append_batch(nodes, counts, ...)` would allocate (copies included).")
      .def("parent", &KVTree::parent, py::arg("node"), "Parent handle, -1 for a root.")
      .def(
          "children",
          [](const KVTree& t, int64_t node) {
            std::vector<int64_t> out;
            t.children(node, out);
            return out;
          },
          py::arg("node"), "Handles of `node`'s children, oldest first.")
      .def("num_children", &KVTree::num_children, py::arg("node"), "Children of `node`.")
      .def("depth", &KVTree::depth, py::arg("node"), "Ancestors of `node` (0 for a root).")
      .def(
          "tokens",
          [](const KVTree& t, int64_t node) {
            py::array_t<int32_t> a(static_cast<py::ssize_t>(t.num_tokens(node)));
            t.tokens(node, a.mutable_data());
            return a;
          },
          py::arg("node"), "All token ids of the path from the root (int32 [num_tokens]).")
      .def(
          "pages",
          [](const KVTree& t, int64_t node) {
            py::array_t<int32_t> a(static_cast<py::ssize_t>(t.num_pages(node)));
            t.pages(node, a.mutable_data());
            return a;
          },
          py::arg("node"), "All page ids of the path from the root (int32 [num_pages]).")
      .def(
          "export_csr",
          [](KVTree& t, py::handle leaves) {
            const I64 lv = int64_arg(leaves, "export_csr", "leaves");
            const int64_t b = lv.size();
            const int64_t nnz = t.export_csr_prepare(ptr(lv), b);
            py::array_t<int32_t> indptr(b + 1), indices(nnz), last(b);
            t.export_csr_fill(ptr(lv), b, indptr.mutable_data(), indices.mutable_data(),
                              last.mutable_data());
            return py::make_tuple(indptr, indices, last);
          },
          py::arg("leaves"),
          "FlashInfer paged-KV layout for `leaves` (any live nodes): `(kv_indptr [B+1],\n"
          "kv_indices [nnz], kv_last_page_len [B])`, int32, built by memcpy of cached\n"
          "flattened page lists.")
      .def(
          "debug_page_refs", [](const KVTree& t) { return to_numpy(t.debug_page_refs()); },
          "Per page, the references live nodes hold (int32 [num_pages of the pool]).")
      .def(
          "debug_live_nodes", [](const KVTree& t) { return to_numpy(t.debug_live_nodes()); },
          "Handles of all live nodes (int64).")
      .def(
          "debug_parents", [](const KVTree& t) { return to_numpy(t.debug_parents()); },
          "Parent handle of each `debug_live_nodes()` entry, -1 for roots (int64).")
      .def("validate", &KVTree::validate,
           "Structural problems the tree finds in itself (empty when consistent).");

  py::class_<RadixCache, std::shared_ptr<RadixCache>>(
      m, "RadixCache",
      "Page-granular prefix cache over token ids sharing the pool's refcounts.\n\n"
      "Each entry is one full page (page_size token ids) holding one reference.\n"
      "`match_prefix` pins the match until `unpin`; eviction takes unpinned leaves in LRU\n"
      "order. Times default to the monotonic clock (`time.monotonic()`), or pass `now`\n"
      "explicitly. The cache keeps its pool alive.")
      .def(py::init([](const std::shared_ptr<BlockPool>& pool) {
             auto cache = std::make_shared<RadixCache>(pool);
             pool->add_user(cache);  // so check_invariants(pool) finds it
             return cache;
           }),
           py::arg("pool").none(false), py::keep_alive<1, 2>())
      .def_property_readonly("pool", &RadixCache::pool, "The pool whose pages are cached.")
      .def_property_readonly("num_entries", &RadixCache::num_entries,
                             "Cached pages (one entry each).")
      .def_property_readonly("num_pinned", &RadixCache::num_pinned,
                             "Entries pinned by a `match_prefix` not yet unpinned.")
      .def_property_readonly("num_evictable", &RadixCache::num_evictable,
                             "Unpinned leaf entries, the candidates of the next eviction.")
      .def(
          "match_prefix",
          [](RadixCache& c, py::handle tokens, py::object now, bool pin) {
            const I32 tk = int32_arg(tokens, "match_prefix", "tokens");
            std::vector<int32_t> pages;
            const double t = now.is_none() ? monotonic_now() : now.cast<double>();
            const int64_t n = c.match_prefix(ptr(tk), tk.size(), t, pages, pin);
            return py::make_tuple(n, to_numpy(pages));
          },
          py::arg("tokens"), py::arg("now") = py::none(), py::arg("pin") = true,
          "Longest cached page-aligned prefix: `(num_tokens, pages int32)`. Pinned (when\n"
          "`pin` and non-empty) until `unpin(pages)`.")
      .def(
          "unpin",
          [](RadixCache& c, int64_t last) {
            c.unpin(checked_int32(last, 0, last_page(*c.pool()), "unpin", "last_page"));
          },
          py::arg("last_page"), "Unpin a match by its last page id.")
      .def(
          "unpin",
          [](RadixCache& c, py::handle pages) {
            const I32 pg = int32_arg(pages, "unpin", "pages", 0, last_page(*c.pool()));
            if (pg.size() > 0) c.unpin(pg.data()[pg.size() - 1]);
          },
          py::arg("pages"), "Unpin a match: pass its `pages` (empty: nothing to unpin).")
      .def(
          "insert",
          [](RadixCache& c, py::handle tokens, py::handle pages, py::object now) {
            const I32 tk = int32_arg(tokens, "insert", "tokens");
            const I32 pg = int32_arg(pages, "insert", "pages", 0, last_page(*c.pool()));
            const double t = now.is_none() ? monotonic_now() : now.cast<double>();
            return c.insert(ptr(tk), tk.size(), ptr(pg), pg.size(), t);
          },
          py::arg("tokens"), py::arg("pages"), py::arg("now") = py::none(),
          "Cache the full pages of a sequence (e.g. `tree.tokens(n), tree.pages(n)`).\n"
          "Returns the number of pages newly cached (each gains one reference).")
      .def("evict", &RadixCache::evict, py::arg("num_pages"),
           "Evict LRU unpinned entries until `num_pages` pages were freed (or no candidate is\n"
           "left); entries whose page a live sequence still holds are skipped. Returns the\n"
           "pages freed.")
      .def("evict_expired", &RadixCache::evict_expired, py::arg("now"), py::arg("ttl"),
           "Evict unpinned entries not used since `now - ttl`; returns entries evicted.")
      .def("clear", &RadixCache::clear, "Evict every unpinned entry; returns entries evicted.")
      .def("reset_stats", &RadixCache::reset_stats, "Zero the counters of `stats()`.")
      .def(
          "stats",
          [](const RadixCache& c) {
            const RadixStats& s = c.stats();
            py::dict d;
            d["queries"] = s.queries;
            d["hits"] = s.hits;
            d["hit_rate"] =
                s.queries ? static_cast<double>(s.hits) / static_cast<double>(s.queries) : 0.0;
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
          },
          "queries, hits, hit_rate, tokens_queried, tokens_saved, token_hit_rate,\n"
          "inserted_pages, evictions, pages_freed, entries, pinned.")
      .def(
          "debug_page_refs", [](const RadixCache& c) { return to_numpy(c.debug_page_refs()); },
          "Per page, the references cache entries hold (int32 [num_pages of the pool]).")
      .def("validate", &RadixCache::validate,
           "Structural problems the cache finds in itself (empty when consistent).");

  py::class_<Scheduler, std::shared_ptr<Scheduler>>(
      m, "Scheduler",
      "Runnable leaves ordered by priority (higher first, FIFO among equals).\n\n"
      "Each step gets at most `token_budget` tokens; a leaf with P pending prompt tokens\n"
      "gets `min(P, remaining budget, chunk_size)`, a decoding leaf (P = 0) one; at most\n"
      "`max_batch` leaves (0: no limit). `tree` is only needed for `preempt_candidates`.\n"
      "`token_budget` and `chunk_size` >= 1, `max_batch` >= 0, all ints, not bool.")
      .def(py::init([](const IntArg& token_budget, const IntArg& chunk_size,
                       const IntArg& max_batch, std::shared_ptr<KVTree> tree) {
             const char* fn = "Scheduler";
             return std::make_shared<Scheduler>(
                 int_arg(token_budget, fn, "token_budget", 1, kInt64Max),
                 int_arg(chunk_size, fn, "chunk_size", 1, kInt64Max),
                 int_arg(max_batch, fn, "max_batch", 0, kInt64Max), std::move(tree));
           }),
           py::arg("token_budget"), py::arg("chunk_size") = 512, py::arg("max_batch") = 0,
           py::arg("tree") = nullptr)
      .def("add", &Scheduler::add, py::arg("leaf"), py::arg("priority") = 0.0,
           py::arg("pending_tokens") = 0,
           "Register a runnable leaf with `pending_tokens` prompt tokens still to prefill.")
      .def("remove", &Scheduler::remove, py::arg("leaf"), "Unregister a leaf.")
      .def("set_priority", &Scheduler::set_priority, py::arg("leaf"), py::arg("priority"),
           "Change priority; the leaf keeps its FIFO position among equals.")
      .def("set_pending", &Scheduler::set_pending, py::arg("leaf"), py::arg("pending_tokens"),
           "Set the prompt tokens a leaf still has to prefill.")
      .def("pending", &Scheduler::pending, py::arg("leaf"),
           "Prompt tokens the leaf still has to prefill.")
      .def("__contains__", &Scheduler::contains, py::arg("leaf"), "Whether `leaf` is registered.")
      .def("__len__", &Scheduler::size, "Registered leaves.")
      .def_property("token_budget", &Scheduler::token_budget, &Scheduler::set_token_budget,
                    "Most tokens one step plans (settable, >= 1).")
      .def_property_readonly("chunk_size", &Scheduler::chunk_size,
                             "Most prompt tokens of one leaf per step.")
      .def(
          "schedule",
          [](const Scheduler& s) {
            std::vector<int64_t> leaves;
            std::vector<int32_t> counts;
            s.schedule(leaves, counts);
            return py::make_tuple(to_numpy(leaves), to_numpy(counts));
          },
          "This step's plan `(leaves int64 [B], num_new_tokens int32 [B])` over all\n"
          "registered leaves and their stored pending counts. Does not change state; see\n"
          "`advance`.")
      .def(
          "schedule",
          [](const Scheduler& s, py::handle leaves, py::handle pending) {
            const I64 lv = int64_arg(leaves, "schedule", "leaves");
            const I32 pd = int32_arg(pending, "schedule", "pending");
            require_same_length(lv.size(), pd.size(), "schedule", "leaves", "pending");
            std::vector<int64_t> out;
            std::vector<int32_t> counts;
            s.schedule_subset(ptr(lv), ptr(pd), lv.size(), out, counts);
            return py::make_tuple(to_numpy(out), to_numpy(counts));
          },
          py::arg("leaves"), py::arg("pending"),
          "This step's plan over the given registered `leaves` only, using the given\n"
          "`pending` counts (0: decode, one token). Does not change state.")
      .def(
          "preempt_order",
          [](const Scheduler& s, py::handle leaves) {
            const I64 lv = int64_arg(leaves, "preempt_order", "leaves");
            std::vector<int64_t> order;
            s.preempt_order(ptr(lv), lv.size(), order);
            return to_numpy(order);
          },
          py::arg("leaves"),
          "Indices into `leaves` (int64) in preemption order: lowest priority first, newest\n"
          "first among equals.")
      .def(
          "advance",
          [](Scheduler& s, py::handle leaves, py::handle counts) {
            const I64 lv = int64_arg(leaves, "advance", "leaves");
            const I32 ct = int32_arg(counts, "advance", "counts");
            require_same_length(lv.size(), ct.size(), "advance", "leaves", "counts");
            s.advance(ptr(lv), ptr(ct), lv.size());
          },
          py::arg("leaves"), py::arg("counts"),
          "Record that `counts[i]` pending tokens of `leaves[i]` were processed.")
      .def(
          "preempt_candidates",
          [](const Scheduler& s, int64_t pages_needed) {
            std::vector<int64_t> out;
            s.preempt_candidates(pages_needed, out);
            return to_numpy(out);
          },
          py::arg("pages_needed"),
          "Lowest-priority leaves (int64) whose release frees >= `pages_needed` pages (all\n"
          "registered leaves if that is never reached). Needs `tree`.");

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
      "Native cross-check of refcounts, free list and each structure's validate(): the\n"
      "problems found (empty when consistent). dendrite.kv.check_invariants is the full\n"
      "check, recomputed in Python from the raw arrays.");

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
      [](py::handle indptr_in, py::handle indices_in) {
        const I32 indptr = int32_arg(indptr_in, "shared_prefix_pages", "indptr");
        const I32 indices = int32_arg(indices_in, "shared_prefix_pages", "indices");
        const int64_t rows = std::max<int64_t>(indptr.size() - 1, 0);
        if (rows > 0 && indptr.data()[rows] > indices.size())
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
      [](py::handle indptr_in, py::handle last_page_len_in, int64_t shared_pages,
         int64_t page_size, int64_t leaves_per_tile, int64_t target_items, int64_t max_splits,
         int64_t max_items, int64_t block_n, py::array items_in, py::array splits_in) {
        const char* fn = "plan_tree_attention";
        const I32 indptr = int32_arg(indptr_in, fn, "indptr");
        const I32 last_page_len = int32_arg(last_page_len_in, fn, "last_page_len");
        const int64_t b = last_page_len.size();
        // Outputs are written in place: a converted copy would swallow them.
        auto out_arg = [&](const py::array& a, const char* what) {
          if (!a.dtype().equal(py::dtype::of<int32_t>()))
            throw py::type_error(where(fn, what) + " must be an int32 array, got dtype " +
                                 std::string(py::str(a.dtype())));
          return py::reinterpret_borrow<py::array_t<int32_t>>(a);
        };
        py::array_t<int32_t> items_out = out_arg(items_in, "items_out");
        py::array_t<int32_t> splits_out = out_arg(splits_in, "splits_out");
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
        cfg.page_size = checked_int32(page_size, 1, kInt32Max, fn, "page_size");
        cfg.leaves_per_tile = checked_int32(leaves_per_tile, 1, kInt32Max, fn, "leaves_per_tile");
        cfg.target_items = checked_int32(target_items, 1, kInt32Max, fn, "target_items");
        cfg.max_splits = checked_int32(max_splits, 1, kInt32Max, fn, "max_splits");
        cfg.max_items = checked_int32(max_items, 0, kInt32Max, fn, "max_items");
        cfg.block_n = checked_int32(block_n, 1, kInt32Max, fn, "block_n");
        int32_t* items = writable(items_out, static_cast<int64_t>(max_items) * kItemFields,
                                  "items_out");
        int32_t* splits = writable(splits_out, b, "splits_out");
        AttentionWork w = plan_tree_attention(
            ptr(indptr), ptr(last_page_len), b,
            checked_int32(shared_pages, 0, kInt32Max, fn, "shared_pages"), cfg, items, splits);
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

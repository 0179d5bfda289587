// errors.h - exception types of the native core.
//
// They are plain C++ exceptions so the core and its C++ tests build without
// Python; bindings.cpp maps them to Python exception classes.
#pragma once

#include <stdexcept>
#include <string>

namespace dendrite {

// The pool cannot satisfy an allocation. Thrown before any state changes, so
// the caller may evict/preempt and retry (all-or-nothing contract).
class OutOfPages : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Mutation of a node that has children: its pages are shared read-only by the
// children, so the caller must fork it once more to continue that sequence.
class FrozenNode : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// An integer argument outside its valid range (a page id >= num_pages, a
// negative token id, a value that does not fit int32). Thrown before any
// state changes. Python sees a subclass of both ValueError and IndexError
// (page ids were IndexError before the range checks became uniform).
class ArgumentRangeError : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

}  // namespace dendrite

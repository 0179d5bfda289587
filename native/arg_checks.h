// arg_checks.h - range-checked narrowing of caller integers to the core's int32.
//
// Page ids, token ids, counts and slots are int32 inside the core, while
// callers (Python, numpy int64 arrays) hand over wider integers. A silent
// cast would turn page 2^32 into page 0, so every narrowing goes through
// these checks, which throw ArgumentRangeError naming the function, the
// argument and the offending index before anything changes.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "errors.h"

namespace dendrite {

inline constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
inline constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();

[[noreturn]] inline void throw_out_of_range(const char* fn, const char* name, int64_t index,
                                            const std::string& value, int64_t lo, int64_t hi) {
  std::string where = std::string(fn) + ": " + name;
  if (index >= 0) where += "[" + std::to_string(index) + "]";
  throw ArgumentRangeError(where + " = " + value + " is out of range [" + std::to_string(lo) +
                           ", " + std::to_string(hi) + "]");
}

// `v` as int32 when lo <= v <= hi (lo/hi within int32), else ArgumentRangeError.
inline int32_t checked_int32(int64_t v, int64_t lo, int64_t hi, const char* fn, const char* name) {
  if (v < lo || v > hi) throw_out_of_range(fn, name, -1, std::to_string(v), lo, hi);
  return static_cast<int32_t>(v);
}

// Checks n values of any integer type against [lo, hi]; the first bad one
// throws ArgumentRangeError naming it (fn: name[i] = v ...).
template <typename T>
void check_int_range(const T* src, int64_t n, int64_t lo, int64_t hi, const char* fn,
                     const char* name) {
  static_assert(std::is_integral<T>::value, "check_int_range takes integers");
  for (int64_t i = 0; i < n; ++i) {
    const T v = src[i];
    bool ok;
    if constexpr (std::is_unsigned<T>::value) {
      // Compare unsigned values as unsigned: uint64 above INT64_MAX must not wrap.
      ok = hi >= 0 && static_cast<uint64_t>(v) <= static_cast<uint64_t>(hi) &&
           (lo <= 0 || static_cast<uint64_t>(v) >= static_cast<uint64_t>(lo));
    } else {
      ok = static_cast<int64_t>(v) >= lo && static_cast<int64_t>(v) <= hi;
    }
    if (!ok) {
      const std::string s = std::is_unsigned<T>::value ? std::to_string(static_cast<uint64_t>(v))
                                                       : std::to_string(static_cast<int64_t>(v));
      throw_out_of_range(fn, name, i, s, lo, hi);
    }
  }
}

// Copies n integers into dst as D (int32 or int64), all-or-nothing: every
// value is checked against [lo, hi] (which must lie within D) before the
// first one is written, so a bad value at the end leaves dst untouched.
template <typename T, typename D>
void narrow_ints(const T* src, int64_t n, int64_t lo, int64_t hi, D* dst, const char* fn,
                 const char* name) {
  check_int_range(src, n, lo, hi, fn, name);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i]);
}

}  // namespace dendrite

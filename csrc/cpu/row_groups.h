// The GEMV kernels keep one set of accumulators per row of x in registers, so the row count of a pass must be a
// compile-time constant: this runs a kernel over M rows in passes of up to Max rows, the last pass with the rows
// that are left, each pass's count a template constant. ATen-free, for every instruction set's kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lowbit {

template <int Rows, class Body>
inline void call_with_row_count(int64_t rows, int64_t m, Body& body) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return call_with_row_count<Rows - 1>(rows, m, body);
  }
  body(std::integral_constant<int, Rows>{}, m);
}

// body(rows, m) for m = 0, Max, 2 Max, ... < M, with rows = min(Max, M - m) as a std::integral_constant (use it as
// a template argument: kernel<rows>(...)).
template <int Max, class Body>
inline void for_each_row_group(int64_t M, Body&& body) {
  for (int64_t m = 0; m < M; m += Max) call_with_row_count<Max>(std::min<int64_t>(Max, M - m), m, body);
}

}  // namespace lowbit

// The linear ops compute x [..., K] as the matrix of its rows [M, K] and return [..., N]: those shapes, for the
// CPU and CUDA kernels alike (the Meta kernels do the same with symbolic sizes in meta.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <vector>

namespace lowbit {

// Rows of x as a matrix: the product of all its dimensions but the last.
inline int64_t row_count(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// x as [rows, K] (a view where x's layout allows).
inline at::Tensor flatten_rows(const at::Tensor& x) { return x.reshape({row_count(x), x.size(-1)}); }

// x's sizes with the last one N: the shape a linear with N output features returns for x.
inline std::vector<int64_t> linear_output_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

}  // namespace lowbit

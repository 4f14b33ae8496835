// The portable kernels' dot product of a weight row (float32 or int8) with a float32 row of x.
#pragma once

#include <cstdint>

namespace lowbit {

// 16 independent partial sums: the compiler vectorizes them, and the pairwise finish keeps the rounding
// error of long rows close to a BLAS dot product's rather than a running sum's.
template <typename Weight>
float dot(const Weight* w, const float* x, int64_t K) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += static_cast<float>(w[k + j]) * x[k + j];
  float tail = 0.f;
  for (; k < K; ++k) tail += static_cast<float>(w[k]) * x[k];
  for (int width = 8; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0] + tail;
}

}  // namespace lowbit

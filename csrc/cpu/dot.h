// The portable kernels' dot product of a weight row (float32 or int8) with a float32 row of x.
#pragma once

#include <cstdint>

namespace lowbit {

// 64 independent partial sums (the tail adds into the first ones): the compiler vectorizes them, and the pairwise
// finish keeps the rounding error of long rows below a BLAS dot product's rather than near a running sum's. With 16
// sums and a running tail, K = 1025 came within 0.84 of the tests' tolerance (twice the reference's error) in 400
// random cases, and a run of the suite failed once; with 64 the worst was 0.65.
template <typename Weight>
float dot(const Weight* w, const float* x, int64_t K) {
  float acc[64] = {};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int j = 0; j < 64; ++j) acc[j] += static_cast<float>(w[k + j]) * x[k + j];
  for (int j = 0; k + j < K; ++j) acc[j] += static_cast<float>(w[k + j]) * x[k + j];
  for (int width = 32; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

}  // namespace lowbit

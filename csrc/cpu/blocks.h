// The per-block scan both blockwise quantizers start with: a block's absmax, and whether it is finite.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lowbit {

struct BlockScan {
  float absmax;
  bool finite;
};

// Reads src[0, len) as float; copies the values to `copy` when it is not null.
template <typename scalar_t>
BlockScan scan_block(const scalar_t* src, int64_t len, float* copy) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < len; ++i) {
    const float v = static_cast<float>(src[i]);
    if (copy) copy[i] = v;
    amax = std::max(amax, std::abs(v));
    finite &= std::isfinite(v);
  }
  return {amax, finite};
}

}  // namespace lowbit

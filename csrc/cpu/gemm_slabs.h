// The many-rows path of the CPU linears with a compressed weight: out[:, slab] = x @ W[slab].T, with one
// slab of weight rows decoded to float32 at a time and handed to the BLAS GEMM, so decoding is amortized
// over all rows of x and the full-precision weight never exists at once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace lowbit {

// Weight slab handed to the GEMM at a time: 4 MiB of float32. Whole small layers fit in one call (at 512
// rows, a 1536x576 4-bit layer took 6.6 ms this way against 9.8 ms in 1 MiB slabs, fp32 6.4 ms); the slab is
// written once and then streamed by the GEMM, so L2 need not hold it.
constexpr int64_t kSlabFloats = 1 << 20;

// x: float32 [M, K]; out: float32 [M, N]. decode(n0, n1, dst) writes weight rows [n0, n1) as float32 rows of
// K values, in the same column order as x.
template <typename Decode>
void gemm_slabs(int64_t N, int64_t K, const at::Tensor& x, at::Tensor& out, const Decode& decode) {
  const int64_t slab_rows = std::min(N, std::max<int64_t>(16, kSlabFloats / std::max<int64_t>(K, 1)));
  at::Tensor slab = at::empty({slab_rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += slab_rows) {
    const int64_t rows = std::min(slab_rows, N - n0);
    float* dst = slab.data_ptr<float>();
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) { decode(n0 + r0, n0 + r1, dst + r0 * K); });
    out.narrow(1, n0, rows).copy_(at::mm(x, slab.narrow(0, 0, rows).t()));
  }
}

}  // namespace lowbit

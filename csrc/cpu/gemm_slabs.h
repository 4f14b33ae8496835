// The many-rows path of the CPU linears with a compressed weight: out[:, slab] = x @ W[slab].T, with one
// slab of weight rows decoded to float32 at a time and handed to the BLAS GEMM, so decoding is amortized
// over all rows of x and the full-precision weight never exists at once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lowbit {

// Weight slab handed to the GEMM at a time, as a float32 count: 4 x the size of x (M x K), between 256 Ki
// (1 MiB) and 4 Mi (16 MiB). Each GEMM call re-packs all of x, so the slab must be large against x, yet a slab
// that stays in cache is cheaper to write and read. Measured 2026-11-29 on a 2-core Sapphire Rapids VM:
// 4096 x 4096 at M = 64, 1 Mi slabs beat 4 Mi (1.04x against 0.88x of fp32); at M = 512, 4 Mi beat 1 Mi
// (0.93x against 0.89x) and 16 Mi lost (0.73x); the built-in model's small layers at M = 64, whose x is small,
// went from 0.84-0.92x to 0.88-0.98x with slabs that fit L2 (256 Ki floats, not 1 Mi).
constexpr int64_t kMinSlabFloats = 1 << 18, kMaxSlabFloats = 1 << 22, kSlabPerX = 4;

// The slab's memory, kept per calling thread and reused: a fresh allocation each call comes straight from
// mmap at these sizes, and its page faults cost a fifth of a small layer's call (192 x 576 at 64 rows).
inline float* slab_memory(int64_t floats) {
  thread_local std::vector<float> memory;
  if (static_cast<int64_t>(memory.size()) < floats) memory.resize(floats);
  return memory.data();
}

// x: float32 [M, K]; out: float32 [M, N]. decode(n0, n1, dst) writes weight rows [n0, n1) as float32 rows of
// K values, in the same column order as x.
template <typename Decode>
void gemm_slabs(int64_t N, int64_t K, const at::Tensor& x, at::Tensor& out, const Decode& decode) {
  const int64_t slab_floats = std::clamp(kSlabPerX * x.size(0) * K, kMinSlabFloats, kMaxSlabFloats);
  const int64_t slab_rows = std::min(N, std::max<int64_t>(16, slab_floats / std::max<int64_t>(K, 1)));
  float* dst = slab_memory(slab_rows * K);
  const at::Tensor slab = at::from_blob(dst, {slab_rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += slab_rows) {
    const int64_t rows = std::min(slab_rows, N - n0);
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) { decode(n0 + r0, n0 + r1, dst + r0 * K); });
    // Straight into the output's columns (a row-major view with leading dimension N, which the GEMM takes
    // as is): no temporary, no copy.
    at::Tensor columns = out.narrow(1, n0, rows);
    at::mm_out(columns, x, slab.narrow(0, 0, rows).t());
  }
}

}  // namespace lowbit

// The many-rows path of the CPU linears with a compressed weight where no kernel of their own multiplies
// (the portable level: CPUs without AVX2, or LOWBIT_CPU_ISA=portable): out[:, slab] = x @ W[slab].T, with one slab
// of weight rows decoded to float32 at a time and handed to the BLAS GEMM, so decoding is amortized over all
// rows of x and the full-precision weight never exists at once. LLM.int8()'s portable int8 product takes the same
// slabs with a multiply of its own (exact K slices summed in int32, int8.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lowbit {

// Weight slab decoded at a time by each thread, as a float32 count: 4 x the size of x (M x K), between 256 Ki
// (1 MiB, which stays in a 2 MiB L2 while the GEMM reads it back) and 1 Mi (4 MiB a thread). Each GEMM call
// re-packs all of x, so the slab must be large against x; beyond 1 Mi it no longer measured faster (4096 x 4096
// and 14336 x 4096 at 512 rows: 0.93-0.99x of fp32 with 1 Mi or 4 Mi, within the machine's noise).
constexpr int64_t kMinSlabFloats = 1 << 18, kMaxSlabFloats = 1 << 20, kSlabPerX = 4;
// Rows of x per thread from which a weight that fits one slab is shared whole (see gemm_slabs).
constexpr int64_t kMinRowsPerThreadForRowSplit = 128;

// The slab's memory, kept per thread and reused: a fresh allocation each call comes straight from mmap at
// these sizes, and its page faults cost a fifth of a small layer's call (192 x 576 at 64 rows). Aligned to a
// cache line (64 bytes), so no vector load of it straddles two lines.
inline float* slab_memory(int64_t floats) {
  constexpr int64_t kLineFloats = 16;
  thread_local std::vector<float> memory;
  if (static_cast<int64_t>(memory.size()) < floats + kLineFloats) memory.resize(floats + kLineFloats);
  const auto address = reinterpret_cast<uintptr_t>(memory.data());
  return memory.data() + (-address / sizeof(float)) % kLineFloats;
}

// out = x @ w.T as two GEMMs over the halves of K, the second adding to the first. The GEMM runs single-threaded
// here, where the reference's multi-threaded BLAS call may split K among threads; one single-threaded sum over
// K = 1024 came within 0.88 of the tests' tolerance (twice the reference's error) in 400 random cases, the sum of
// two half sums within 0.51. The second call reads and writes the output once more: 1 / K of the work.
inline void mm_over_halves_of_k(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  const int64_t K = x.size(1), half = K / 2;
  at::mm_out(out, x.narrow(1, 0, half), w.narrow(1, 0, half).t());
  out.addmm_(x.narrow(1, half, K - half), w.narrow(1, half, K - half).t());
}

// x: float32 [M, K]; out: [M, N]. decode(n0, n1, dst) writes weight rows [n0, n1) as float32 rows of K values, in
// the same column order as x; multiply(out_part, x_part, slab) writes x_part @ slab.T into out_part (a view of out).
//
// Each thread takes an equal share of the weight rows and, slab by slab, decodes them and multiplies them
// with a GEMM of its own (single-threaded inside the parallel region). Sharing each slab among the threads
// instead (decode in parallel, then one threaded GEMM per slab) put a barrier between every decode and GEMM
// and sent the decoded slab from one core's cache to the other's. Measured 2026-11-29 (2-core Sapphire Rapids
// VM, NF4 with its AVX-512 decode, before the panel GEMM took that path over; ratio to fp32 F.linear):
// 1536 x 576 at 64 rows 0.63-0.86x shared / 1.03-1.31x per thread, 4096 x 4096 at 512 rows 0.89x / 0.93x. A
// share is cut into equal slabs (288 rows as 144 + 144, not 256 + 32: 0.89x against 0.79x on 576 x 1536 at 64
// rows).
//
// A weight that fits one slab with many rows of x is split the other way: every thread decodes all of it and
// multiplies its own share of x's rows, since halving a narrow weight (192 rows) costs the GEMM more than a
// second decode costs (192 x 576 at 512 rows: 0.88-0.91x against 0.78-0.80x).
template <typename Decode, typename Multiply>
void gemm_slabs(int64_t N, int64_t K, const at::Tensor& x, at::Tensor& out, const Decode& decode,
                const Multiply& multiply) {
  const int64_t M = x.size(0);
  const int64_t slab_floats = std::clamp(kSlabPerX * M * K, kMinSlabFloats, kMaxSlabFloats);
  const int64_t threads = std::max(1, at::get_num_threads());
  // ATen calls on the worker threads run under the caller's thread-local state (inference mode, grad mode):
  // OpenMP workers do not inherit it, and writing an inference-mode `out` outside inference mode is an error.
  const at::ThreadLocalState caller_state;
  if (N * K <= slab_floats && M >= kMinRowsPerThreadForRowSplit * threads) {
    at::parallel_for(0, M, (M + threads - 1) / threads, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(caller_state);
      float* dst = slab_memory(N * K);
      decode(0, N, dst);
      multiply(out.narrow(0, begin, end - begin), x.narrow(0, begin, end - begin),
               at::from_blob(dst, {N, K}, x.options()));
    });
    return;
  }
  const int64_t share = std::max<int64_t>(16, (N + threads - 1) / threads);
  at::parallel_for(0, N, share, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    const int64_t most_rows = std::max<int64_t>(16, slab_floats / std::max<int64_t>(K, 1));
    const int64_t slabs = (end - begin + most_rows - 1) / most_rows;
    const int64_t slab_rows = (end - begin + slabs - 1) / slabs;
    float* dst = slab_memory(slab_rows * K);
    const at::Tensor slab = at::from_blob(dst, {slab_rows, K}, x.options());
    for (int64_t n0 = begin; n0 < end; n0 += slab_rows) {
      const int64_t rows = std::min(slab_rows, end - n0);
      decode(n0, n0 + rows, dst);
      // Straight into the output's columns (a row-major view with leading dimension N, which the GEMM takes
      // as is): no temporary, no copy.
      multiply(out.narrow(1, n0, rows), x, slab.narrow(0, 0, rows));
    }
  });
}

// The float linears' slab GEMM: out = x @ W.T in float32.
template <typename Decode>
void gemm_slabs(int64_t N, int64_t K, const at::Tensor& x, at::Tensor& out, const Decode& decode) {
  gemm_slabs(N, K, x, out, decode, mm_over_halves_of_k);
}

}  // namespace lowbit

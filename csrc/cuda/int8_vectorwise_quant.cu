// LLM.int8() activation quantization on CUDA: per-row absmax int8 codes with outlier columns, the same
// codes, row scales and outlier columns as the CPU kernel (csrc/cpu/int8.cpp) and lowbit.reference.
//  * One CTA per row reads the row once: the absmax over its non-outlier elements (|x| < threshold; NaN is
//    never an outlier and never the absmax), whether a NaN/Inf outside the outliers poisons the row, and
//    a byte flag for every column that holds an outlier element. Flags are plain stores of 1 from any row:
//    racing writers all store the same value, so no atomics are needed.
//  * Without a threshold a row's codes depend on that row only, so the same CTA writes them straight after
//    its block-wide max (the row is re-read from L1/L2, not HBM). With a threshold, the codes need every
//    row's flags (an outlier column is zeroed in all rows), so a second kernel writes them.
//  * For int8_linear, one more CTA of that second kernel compacts the flags into an ascending int32 list and
//    a device-side count (one block-wide prefix sum), so the matmul epilogues loop over the outlier columns
//    without a host sync; the list has K entries, so no count can overflow it. The flags and the count share
//    one zero-filled buffer. Up to kOneCtaRows rows (decode) one CTA does all of it, fill included, in one launch:
//    int8_linear's decode step is then two launches, this and the GEMV, threshold or not.
//    The op itself returns the columns as an int64 tensor whose length depends on the data: at::nonzero
//    synchronises, as any such op must.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/int8.cuh"
#include "cuda/launch.cuh"
#include "formats.h"
#include "rows.h"
#include "validate.h"

namespace lowbit::cuda {
namespace {

// Threads per row CTA: about 8 elements each, so a long decode row (K = 14336) has 1024 threads with
// loads in flight, while K = 17 takes one warp. block_max needs a multiple of 32.
int row_threads(int64_t K) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(ceil_div(K, 8), 32) * 32, 32, 1024));
}

// The CPU's float32 arithmetic for one row: (1 / absmax) * 127, multiply, round half to even. A subnormal
// absmax overflows the reciprocal; such rows divide instead. A zero or poisoned (NaN) absmax gives 0.
struct RowQuantizer {
  float absmax, scale;
  bool zero, divide;
  __device__ explicit RowQuantizer(float row_stat)
      : absmax(row_stat), scale(mul_rn(div_rn(1.0f, row_stat), 127.0f)), zero(!(row_stat > 0.f)),
        divide(!isfinite(scale)) {}
  __device__ int8_t operator()(float v) const {
    if (zero) return 0;
    return static_cast<int8_t>(__float2int_rn(divide ? mul_rn(div_rn(v, absmax), 127.0f) : mul_rn(v, scale)));
  }
};

// Writes row m's codes; column_flags (null without a threshold) zeroes the outlier columns.
template <typename T>
__device__ void write_row_codes(const T* __restrict__ row, int64_t K, float row_stat,
                                const uint8_t* __restrict__ column_flags, int8_t* __restrict__ codes) {
  const RowQuantizer quantize(row_stat);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    codes[k] = column_flags && column_flags[k] ? int8_t{0} : quantize(static_cast<float>(row[k]));
}

template <typename T, bool kWriteCodes>
__global__ void row_stats_kernel(const T* __restrict__ x, int64_t K, float threshold, bool has_threshold,
                                 float* __restrict__ row_stats, uint8_t* __restrict__ column_flags,
                                 int8_t* __restrict__ codes) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  float absmax = 0.f;
  bool poisoned = false;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float magnitude = fabsf(static_cast<float>(row[k]));
    if (has_threshold && magnitude >= threshold) {
      column_flags[k] = 1;
    } else {
      absmax = fmaxf(absmax, magnitude);  // fmaxf ignores NaN, as the reference masks it out
      poisoned |= !isfinite(magnitude);
    }
  }
  absmax = block_max(absmax);
  poisoned = __syncthreads_or(poisoned);
  const float row_stat = poisoned ? std::numeric_limits<float>::quiet_NaN() : absmax;
  if (threadIdx.x == 0) row_stats[m] = row_stat;
  if constexpr (kWriteCodes) write_row_codes(row, K, row_stat, nullptr, codes + m * K);
}

// Inclusive prefix sum over a warp (Kogge-Stone with shuffles).
__device__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int below = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += below;
  }
  return v;
}

// The exclusive prefix sum of v over the CTA (blockDim.x a multiple of 32), and the CTA's total.
__device__ int block_exclusive_sum(int v, int& total) {
  __shared__ int warp_prefix[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int inclusive = warp_inclusive_sum(v);
  if (lane == 31) warp_prefix[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // each lane reads, then writes, its own slot
    const int prefix = warp_inclusive_sum(lane < warps ? warp_prefix[lane] : 0);
    if (lane < warps) warp_prefix[lane] = prefix;
  }
  __syncthreads();
  total = warp_prefix[warps - 1];
  return inclusive - v + (warp > 0 ? warp_prefix[warp - 1] : 0);
}

// Each thread counts the flags of its contiguous slice, one prefix sum gives each slice its first slot, and
// the slices are written in order, so the list ascends (the epilogues then sum the outlier columns in the
// same order on every run: graph replays equal eager calls bit for bit).
__device__ void list_outlier_columns(const uint8_t* __restrict__ column_flags, int64_t K, int32_t* __restrict__ columns,
                                     int32_t* __restrict__ count) {
  const int64_t per_thread = (K + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * per_thread, end = min(K, begin + per_thread);
  int flagged = 0;
  for (int64_t k = begin; k < end; ++k) flagged += column_flags[k];
  int total = 0;
  int slot = block_exclusive_sum(flagged, total);
  for (int64_t k = begin; k < end; ++k)
    if (column_flags[k]) columns[slot++] = static_cast<int32_t>(k);
  if (threadIdx.x == 0) *count = total;
}

// Blocks 0..M-1 write the codes of their rows; with a list to fill (columns non-null), block M compacts the flags.
template <typename T>
__global__ void row_codes_kernel(const T* __restrict__ x, int64_t M, int64_t K, const float* __restrict__ row_stats,
                                 const uint8_t* __restrict__ column_flags, int8_t* __restrict__ codes,
                                 int32_t* __restrict__ columns, int32_t* __restrict__ count) {
  const int64_t m = blockIdx.x;
  if (m == M) {
    list_outlier_columns(column_flags, K, columns, count);
    return;
  }
  write_row_codes(x + m * K, K, row_stats[m], column_flags, codes + m * K);
}

// Decode-sized inputs (M <= kOneCtaRows) with a threshold, in one CTA and one launch: it clears the flags and the
// count itself (no fill launch), then does per row what row_stats_kernel does, then the codes and the list as
// row_codes_kernel does (the same functions: the same bytes). M x K is small at decode (8 x 14336 at most for
// Llama-3-8B shapes), so one SM's latency costs less than the two launches it saves, which a decode step pays in
// every layer (int8_linear with a threshold: this kernel and the GEMV).
constexpr int64_t kOneCtaRows = 8;
constexpr int kOneCtaThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kOneCtaThreads)
    one_cta_activations_kernel(const T* __restrict__ x, int64_t M, int64_t K, float threshold,
                               float* __restrict__ row_stats, uint8_t* __restrict__ column_flags,
                               int8_t* __restrict__ codes, int32_t* __restrict__ columns, int32_t* __restrict__ count) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) column_flags[k] = 0;
  __syncthreads();  // global writes of this CTA are visible to it after the barrier
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    float absmax = 0.f;
    bool poisoned = false;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float magnitude = fabsf(static_cast<float>(row[k]));
      if (magnitude >= threshold) {
        column_flags[k] = 1;
      } else {
        absmax = fmaxf(absmax, magnitude);
        poisoned |= !isfinite(magnitude);
      }
    }
    absmax = block_max(absmax);
    poisoned = __syncthreads_or(poisoned);
    if (threadIdx.x == 0) row_stats[m] = poisoned ? std::numeric_limits<float>::quiet_NaN() : absmax;
  }
  __syncthreads();  // every row's flags and stats before any code
  for (int64_t m = 0; m < M; ++m) write_row_codes(x + m * K, K, row_stats[m], column_flags, codes + m * K);
  if (columns) list_outlier_columns(column_flags, K, columns, count);
}

}  // namespace

Int8Activations quantize_activations(const at::Tensor& x2, double threshold, bool list_outliers) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const bool has_threshold = threshold > 0;
  const float threshold_f = static_cast<float>(threshold);
  Int8Activations a;
  a.codes = at::empty({M, K}, x2.options().dtype(at::kChar));
  a.row_stats = at::empty({M}, x2.options().dtype(at::kFloat));
  const bool list = has_threshold && list_outliers;
  const bool one_cta = has_threshold && M <= kOneCtaRows;  // clears its own flags and count
  if (one_cta) {
    const at::Tensor scratch = at::empty({1 + ceil_div(K, 4)}, x2.options().dtype(at::kInt));
    a.outlier_count = scratch.narrow(0, 0, 1);
    a.column_flags = scratch.narrow(0, 1, ceil_div(K, 4)).view(at::kByte).narrow(0, 0, K);
  } else if (has_threshold) {
    // One zero fill for the count (an int32) and the K flags (bytes) after it.
    const at::Tensor zeroed = at::zeros({1 + ceil_div(K, 4)}, x2.options().dtype(at::kInt));
    a.outlier_count = zeroed.narrow(0, 0, 1);
    a.column_flags = zeroed.narrow(0, 1, ceil_div(K, 4)).view(at::kByte).narrow(0, 0, K);
  }
  if (list) {
    TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), "lowbit: too many columns for an int32 outlier list");
    a.outlier_columns = at::empty({K}, x2.options().dtype(at::kInt));
  } else {
    a.outlier_count = at::Tensor();
  }
  if (M == 0) return a;
  const unsigned int rows = grid_size(M, "lowbit.int8_vectorwise_quant");
  const int threads = row_threads(K);
  const cudaStream_t stream = current_stream();
  uint8_t* flags = has_threshold ? a.column_flags.data_ptr<uint8_t>() : nullptr;
  LOWBIT_DISPATCH_FLOAT_TYPES(x2.scalar_type(), "int8_vectorwise_quant_cuda", [&] {
    const scalar_t* x = x2.const_data_ptr<scalar_t>();
    float* stats = a.row_stats.data_ptr<float>();
    int8_t* codes = a.codes.data_ptr<int8_t>();
    if (!has_threshold) {
      row_stats_kernel<scalar_t, true><<<rows, threads, 0, stream>>>(x, K, threshold_f, false, stats, flags, codes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (one_cta) {
      one_cta_activations_kernel<scalar_t><<<1, kOneCtaThreads, 0, stream>>>(
          x, M, K, threshold_f, stats, flags, codes, list ? a.outlier_columns.data_ptr<int32_t>() : nullptr,
          list ? a.outlier_count.data_ptr<int32_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    row_stats_kernel<scalar_t, false><<<rows, threads, 0, stream>>>(x, K, threshold_f, true, stats, flags, codes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_codes_kernel<scalar_t><<<grid_size(M + (list ? 1 : 0), "lowbit.int8_vectorwise_quant"), threads, 0, stream>>>(
        x, M, K, stats, flags, codes, list ? a.outlier_columns.data_ptr<int32_t>() : nullptr,
        list ? a.outlier_count.data_ptr<int32_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold) {
  validate_int8_vectorwise_quant(A, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor x2 = flatten_rows(A).contiguous();
  Int8Activations a = quantize_activations(x2, threshold, /*list_outliers=*/false);
  // The number of outlier columns sizes the output: reading it back is this op's one synchronisation
  // (int8_linear keeps the list on the device instead).
  at::Tensor outlier_columns = a.column_flags.defined() && A.numel() > 0
                                   ? at::nonzero(a.column_flags).view(-1)
                                   : at::empty({0}, A.options().dtype(at::kLong));
  return {a.codes.view(A.sizes()), a.row_stats, outlier_columns};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("int8_vectorwise_quant", &int8_vectorwise_quant_cuda); }

}  // namespace lowbit::cuda

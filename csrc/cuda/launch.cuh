// What every lowbit CUDA kernel file shares: the launch discipline (device guard, current stream,
// checked launches) and the block-wide reductions the blockwise quantizers need.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

// The activation and output dtypes lowbit computes in (validate.h rejects the rest): no double kernels.
#define LOWBIT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                        \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lowbit::cuda {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// f(std::integral_constant<int, rows>{}) for rows in [1, 8]: the decode kernels take their row count as a template
// argument (so every loop over rows unrolls without a bounds test), and this is the one switch to it.
template <typename F>
void with_row_count(int64_t rows, const F& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
  TORCH_CHECK(false, "lowbit: a decode kernel takes 1 to 8 rows, got ", rows);
}

// A launch's number of CTAs, refused beyond what gridDim.x holds rather than truncated.
inline unsigned int grid_size(int64_t ctas, const char* op) {
  TORCH_CHECK_VALUE(ctas <= 2147483647, op, ": the input is too large for one launch (", ctas, " CTAs)");
  return static_cast<unsigned int>(ctas);
}

// The stream every kernel launches on: the caller's current stream on the input's device, so lowbit
// ops order with the rest of the program and can be captured in CUDA graphs.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over the CTA (blockDim.x a multiple of 32, at most 1024): warp shuffles, then one value per warp
// through shared memory. Every thread gets the result.
__device__ inline float block_max(float v) {
  __shared__ float per_warp[32];
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  v = warp_max(lane < warps ? per_warp[lane] : 0.f);
  __syncthreads();  // per_warp may be reused by the caller's next reduction
  return v;
}

// The scan both blockwise quantizers start with (the device twin of cpu/blocks.h), over src[first, len) in steps
// of `stride`: the largest |value|; a non-finite element sets *non_finite.
template <typename scalar_t>
__device__ float strided_absmax(const scalar_t* src, int64_t len, int first, int stride, int* non_finite) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = first; i < len; i += stride) {
    const float v = static_cast<float>(src[i]);
    amax = fmaxf(amax, fabsf(v));
    finite &= isfinite(v);
  }
  if (!finite) atomicExch(non_finite, 1);
  return amax;
}

// The absmax of src[0, len) over the CTA, which every thread gets.
template <typename scalar_t>
__device__ float block_absmax(const scalar_t* src, int64_t len, int* non_finite) {
  return block_max(strided_absmax(src, len, threadIdx.x, blockDim.x, non_finite));
}

// The absmax of src[0, len) over one warp, which every lane gets (the whole warp calls it).
template <typename scalar_t>
__device__ float warp_absmax(const scalar_t* src, int64_t len, int* non_finite) {
  return warp_max(strided_absmax(src, len, threadIdx.x % 32, 32, non_finite));
}

}  // namespace lowbit::cuda

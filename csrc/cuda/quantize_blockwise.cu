// 8-bit blockwise quantization against a sorted 256-entry code on CUDA (double quantization of 4-bit
// absmax values): the same bytes and values as csrc/cpu/quantize_blockwise.cpp.
//
// quantize_blockwise: one CTA per block; the code (1 KiB) is staged in shared memory, where every thread
// binary-searches it. Divide (not multiply by the reciprocal) and break distance ties towards the lower
// entry, as the CPU kernel and bitsandbytes do. dequantize_blockwise: one thread per element.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.cuh"
#include "formats.h"
#include "validate.h"

namespace lowbit {
namespace {

constexpr int kQuantizeThreads = 256;
constexpr int kElementwiseThreads = 256;

template <typename scalar_t>
__global__ void quantize_blockwise_kernel(const scalar_t* __restrict__ src, const float* __restrict__ code, int64_t n,
                                          int64_t blocksize, uint8_t* __restrict__ out, float* __restrict__ absmax,
                                          int* __restrict__ non_finite) {
  __shared__ float table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = code[i];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t len = min(blocksize, n - start);
  const float amax = cuda::block_absmax(src + start, len, non_finite);  // its __syncthreads also publishes the table
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
  const float denom = fmaxf(amax, kMinAbsmax);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float x = div_rn(static_cast<float>(src[start + i]), denom);
    int lo = 0, hi = 256;  // first entry > x, as std::upper_bound
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (table[mid] <= x) lo = mid + 1;
      else hi = mid;
    }
    int q = max(lo - 1, 0);
    if (q < 255 && fabsf(x - table[q + 1]) < fabsf(x - table[q])) ++q;
    out[start + i] = static_cast<uint8_t>(q);
  }
}

template <typename scalar_t>
__global__ void dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                            const float* __restrict__ code, int64_t n, int64_t blocksize,
                                            scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<scalar_t>(mul_rn(code[q[i]], absmax[i / blocksize]));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize) {
  validate_quantize_blockwise(A, code, blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const at::Tensor table = code.contiguous();
  const int64_t n = a.numel();
  const int64_t nblocks = cuda::ceil_div(n, blocksize);
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  if (n == 0) return {out, absmax};
  at::Tensor non_finite = at::zeros({1}, a.options().dtype(at::kInt));
  LOWBIT_DISPATCH_FLOAT_TYPES(a.scalar_type(), "quantize_blockwise_cuda", [&] {
    quantize_blockwise_kernel<scalar_t><<<cuda::grid_size(nblocks, "lowbit.quantize_blockwise"), kQuantizeThreads, 0,
                                         cuda::current_stream()>>>(
        a.const_data_ptr<scalar_t>(), table.const_data_ptr<float>(), n, blocksize, out.data_ptr<uint8_t>(),
        absmax.data_ptr<float>(), non_finite.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_finite_input(non_finite.item<int>() == 0, "lowbit.quantize_blockwise");
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  validate_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  const int64_t n = q.numel();
  if (n == 0) return out;
  LOWBIT_DISPATCH_FLOAT_TYPES(dtype, "dequantize_blockwise_cuda", [&] {
    dequantize_blockwise_kernel<scalar_t><<<cuda::grid_size(cuda::ceil_div(n, kElementwiseThreads),
                                                            "lowbit.dequantize_blockwise"), kElementwiseThreads, 0,
                                            cuda::current_stream()>>>(q.const_data_ptr<uint8_t>(),
                                                                      scales.const_data_ptr<float>(),
                                                                      table.const_data_ptr<float>(), n, blocksize,
                                                                      out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace lowbit

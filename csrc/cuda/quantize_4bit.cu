// 4-bit blockwise quantization and dequantization on CUDA: the same bytes and values as the CPU kernels
// (csrc/cpu/quantize_4bit.cpp), so a model quantized on either device saves the same checkpoint.
//
// quantize_4bit: one warp per block of the flattened input (blocksize 32..4096), kQuantizeWarps blocks a CTA: a
// warp finds its block's absmax with shuffles, then encodes pairs of elements into bytes. (A CTA of 256 threads a
// block left 192 of them idle at blocksize 64 and launched ~917k CTAs for a 14336 x 4096 weight.) The arithmetic is the
// CPU's, operation for operation (formats.h mul_rn/div_rn: never fused): a full block multiplies by the
// reciprocal of its absmax, a final partial block divides, and the codebook's midpoints decide ties.
// dequantize_4bit: the kernel linear_4bit dequantizes with (cuda/dequantize_4bit.cuh).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/dequantize_4bit.cuh"
#include "cuda/launch.cuh"
#include "formats.h"
#include "validate.h"

namespace lowbit {
namespace {

constexpr int kQuantizeWarps = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kQuantizeWarps * 32)
    quantize_4bit_kernel(const scalar_t* __restrict__ src, int64_t n, int64_t blocksize, Codebook4 book,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax, int* __restrict__ non_finite) {
  const int lane = threadIdx.x % 32;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kQuantizeWarps + threadIdx.x / 32;
  const int64_t start = block * blocksize;
  if (start >= n) return;  // the whole warp: its shuffles below see every lane
  const int64_t len = min(blocksize, n - start);
  const float amax = cuda::warp_absmax(src + start, len, non_finite);
  if (lane == 0) absmax[block] = amax;
  const float denom = fmaxf(amax, kMinAbsmax);
  const bool full = len == blocksize;
  const float inv = div_rn(1.0f, denom);
  auto encode = [&](float v) {
    const float scaled = full ? mul_rn(v, inv) : div_rn(v, denom);
    return book.encode(fminf(fmaxf(scaled, -1.0f), 1.0f));
  };
  for (int64_t i = 2 * lane; i < len; i += 64) {
    const uint8_t even = encode(static_cast<float>(src[start + i]));
    const uint8_t odd = i + 1 < len ? encode(static_cast<float>(src[start + i + 1])) : book.zero_code;
    packed[(start + i) / 2] = pack_codes(even, odd);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  const Codebook4 book = codebook(validate_quantize_4bit(A, blocksize, quant_type));
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  const int64_t nblocks = cuda::ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  at::Tensor non_finite = at::zeros({1}, a.options().dtype(at::kInt));
  LOWBIT_DISPATCH_FLOAT_TYPES(a.scalar_type(), "quantize_4bit_cuda", [&] {
    quantize_4bit_kernel<scalar_t><<<cuda::grid_size(cuda::ceil_div(nblocks, kQuantizeWarps), "lowbit.quantize_4bit"),
                                    kQuantizeWarps * 32, 0, cuda::current_stream()>>>(
        a.const_data_ptr<scalar_t>(), n, blocksize, book, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
        non_finite.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The CPU kernel refuses non-finite input; so must this one. Reading the flag syncs the stream, which a
  // quantizer (run once per weight, never in a forward) can afford.
  check_finite_input(non_finite.item<int>() == 0, "lowbit.quantize_4bit");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const Codebook4 book =
      codebook(validate_dequantize_4bit(packed, absmax, blocksize, quant_type, c10::fromIntArrayRefSlow(shape), dtype));
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor q = packed.contiguous();
  const at::Tensor scales = absmax.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t n = out.numel();
  Weight4 w{};  // a flat weight: dequantize_4bit reads only its codes, blocksize, table and float scales
  w.packed = q.const_data_ptr<uint8_t>();
  w.blocksize = blocksize;
  for (int i = 0; i < 16; ++i) w.table[i] = book.value[i];
  w.absmax = scales.const_data_ptr<float>();
  LOWBIT_DISPATCH_FLOAT_TYPES(dtype, "dequantize_4bit_cuda", [&] {
    cuda::dequantize_4bit(w, n, out.data_ptr<scalar_t>(), "lowbit.dequantize_4bit");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
}

}  // namespace lowbit

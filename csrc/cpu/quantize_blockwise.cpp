// 8-bit blockwise quantization against a sorted 256-entry code table on the CPU. lowbit uses it
// for double quantization: the 4-bit absmax values (minus their mean) become one byte each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "checks.h"
#include "cpu/blocks.h"
#include "formats.h"
#include "validate.h"

namespace lowbit {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                          int64_t blocksize) {
  validate_quantize_blockwise(A, code, blocksize);
  const at::Tensor a = A.contiguous();
  const at::Tensor table_t = code.contiguous();
  const float* table = table_t.const_data_ptr<float>();
  const int64_t n = a.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  std::atomic<bool> non_finite{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quantize_blockwise", [&] {
    const scalar_t* src = a.const_data_ptr<scalar_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    float* amax_out = absmax.data_ptr<float>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const BlockScan scan = scan_block<scalar_t>(src + start, len, nullptr);
        if (!scan.finite) non_finite.store(true, std::memory_order_relaxed);
        const float amax = amax_out[b] = scan.absmax;
        const float denom = std::max(amax, kMinAbsmax);
        for (int64_t i = 0; i < len; ++i) {
          // Divide (not multiply by the reciprocal) and break distance ties towards the lower
          // entry: bitsandbytes' CPU quantizer does both, and the bytes must match.
          const float x = div_rn(static_cast<float>(src[start + i]), denom);
          int64_t lo = std::upper_bound(table, table + 256, x) - table - 1;
          lo = std::clamp<int64_t>(lo, 0, 255);
          if (lo < 255 && std::abs(x - table[lo + 1]) < std::abs(x - table[lo])) ++lo;
          dst[start + i] = static_cast<uint8_t>(lo);
        }
      }
    });
  });
  check_finite_input(!non_finite.load(), "lowbit.quantize_blockwise");
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  validate_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  const int64_t n = A.numel();
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table_t = code.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_blockwise", [&] {
    const uint8_t* src = q.const_data_ptr<uint8_t>();
    const float* amax = scales.const_data_ptr<float>();
    const float* table = table_t.const_data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<scalar_t>(mul_rn(table[src[i]], amax[i / blocksize]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace lowbit

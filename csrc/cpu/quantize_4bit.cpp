// 4-bit blockwise quantization on the CPU: one float32 absmax per block of the flattened tensor,
// each element scaled into [-1, 1] and rounded to the nearest NF4/FP4 code, two codes per byte.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/isa.h"
#include "formats.h"

namespace lowbit {
namespace {

// Blocks are independent; a few blocks per task keeps scheduling cheap for small blocksizes.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Codes of a full block, 16 at a time: the same scaled value and the same count of midpoints below
// it as Codebook4::encode, as 15 vector compares, so the bytes are identical to the portable path.
__attribute__((target("avx512f"))) void encode_full_block_avx512(const float* vals, int64_t len, float inv,
                                                                 const Codebook4& book, uint8_t* codes) {
  int32_t code_of_sorted[16];
  for (int i = 0; i < 16; ++i) code_of_sorted[i] = book.code_of_sorted[i];
  const __m512i lookup = _mm512_loadu_si512(code_of_sorted);
  const __m512 scale = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(vals + i), scale), lo), hi);
    __m512i count = _mm512_setzero_si512();
    for (int b = 0; b < 15; ++b) {
      const __mmask16 above = _mm512_cmp_ps_mask(_mm512_set1_ps(book.bounds[b]), x, _CMP_LT_OQ);
      count = _mm512_mask_add_epi32(count, above, count, one);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(count, lookup)));
  }
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const char* op = "lowbit.quantize_4bit";
  check_blocksize(blocksize, op);
  const Codebook4& book = codebook(parse_quant_type(quant_type, op));
  check_float(A, op, "A");
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  std::atomic<bool> non_finite{false};
  [[maybe_unused]] const bool avx512 = use_avx512();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quantize_4bit", [&] {
    const scalar_t* src = a.const_data_ptr<scalar_t>();
    uint8_t* dst = packed.data_ptr<uint8_t>();
    float* amax_out = absmax.data_ptr<float>();
    at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      float vals[kMaxBlocksize];
      uint8_t codes[kMaxBlocksize + 1];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        float amax = 0.f;
        bool finite = true;
        for (int64_t i = 0; i < len; ++i) {
          const float v = static_cast<float>(src[start + i]);
          vals[i] = v;
          amax = std::max(amax, std::abs(v));
          finite &= std::isfinite(v);
        }
        if (!finite) non_finite.store(true, std::memory_order_relaxed);
        amax_out[b] = amax;
        // Full blocks multiply by the reciprocal, a final partial block divides: that is exactly
        // what the reference (and bitsandbytes) computes, and on a tie it decides the code.
        const float denom = std::max(amax, kMinAbsmax);
        const float inv = 1.0f / denom;
        if (len == blocksize) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
          if (avx512) {
            encode_full_block_avx512(vals, len, inv, book, codes);
          } else
#endif
          for (int64_t i = 0; i < len; ++i) codes[i] = book.encode(std::clamp(vals[i] * inv, -1.0f, 1.0f));
        } else {
          for (int64_t i = 0; i < len; ++i) codes[i] = book.encode(std::clamp(vals[i] / denom, -1.0f, 1.0f));
        }
        codes[len] = book.zero_code;  // pads the low nibble of a final odd element
        for (int64_t i = 0; i < len; i += 2) dst[(start + i) / 2] = static_cast<uint8_t>(codes[i] << 4 | codes[i + 1]);
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite.load(), op, ": input contains NaN or Inf; a block's absmax would be meaningless");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "lowbit.dequantize_4bit";
  check_blocksize(blocksize, op);
  const float* table = code_table(parse_quant_type(quant_type, op));
  check_dtype(packed, at::kByte, op, "packed");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_same_device(packed, absmax, op, "absmax");
  check_out_dtype(dtype, op);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": negative size in shape ", shape);
    n *= s;
  }
  check_numel(packed, (n + 1) / 2, op, "packed");
  check_numel(absmax, (n + blocksize - 1) / blocksize, op, "absmax");
  const at::Tensor q = packed.contiguous();
  const at::Tensor scales = absmax.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t nblocks = scales.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit", [&] {
    const uint8_t* src = q.const_data_ptr<uint8_t>();
    const float* amax = scales.const_data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const float scale = amax[b];
        for (int64_t i = 0; i < len; ++i) {
          const uint8_t byte = src[(start + i) >> 1];
          const uint8_t code = (i & 1) ? (byte & 0xF) : (byte >> 4);
          dst[start + i] = static_cast<scalar_t>(table[code] * scale);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace lowbit

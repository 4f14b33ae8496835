// 4-bit blockwise quantization on the CPU: one float32 absmax per block of the flattened tensor,
// each element scaled into [-1, 1] and rounded to the nearest NF4/FP4 code, two codes per byte.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "checks.h"
#include "cpu/blocks.h"
#include "cpu/isa.h"
#include "cpu/nibbles_avx2.h"
#include "cpu/nibbles_neon.h"
#include "formats.h"
#include "validate.h"

namespace lowbit {
namespace {

// Blocks are independent; a few blocks per task keeps scheduling cheap for small blocksizes.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }

#if LOWBIT_X86
// Codes of a full block, 16 at a time: the same scaled value and the same count of midpoints below
// it as Codebook4::encode, as 15 vector compares, so the bytes are identical to the portable path.
LOWBIT_AVX512 void encode_full_block_avx512(const float* vals, int64_t len, float inv,
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

// AVX2: the same count, 8 at a time (a compare leaves -1 where the midpoint is below, so subtracting counts it);
// code_of_sorted[count] is a 16-entry lookup in two halves, as nibbles_avx2.h decodes.
LOWBIT_AVX2 void encode_full_block_avx2(const float* vals, int64_t len, float inv, const Codebook4& book,
                                        uint8_t* codes) {
  int32_t code_of_sorted[16];
  for (int i = 0; i < 16; ++i) code_of_sorted[i] = book.code_of_sorted[i];
  const __m256i lookup_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code_of_sorted));
  const __m256i lookup_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code_of_sorted + 8));
  const __m256 scale = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(vals + i), scale), lo), hi);
    __m256i count = _mm256_setzero_si256();
    for (int b = 0; b < 15; ++b)
      count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(book.bounds[b]), x, _CMP_LT_OQ)));
    const __m256i code = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lookup_low, count)),
        _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lookup_high, count)),
        _mm256_castsi256_ps(_mm256_slli_epi32(count, 28))));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), code);
    for (int j = 0; j < 8; ++j) codes[i + j] = static_cast<uint8_t>(lanes[j]);
  }
}

// Full blocks of a float32 output, 8 values at a time.
LOWBIT_AVX2 void dequantize_blocks_avx2(const uint8_t* packed, const float* absmax, const float* table, int64_t blocksize,
                                        int64_t b0, int64_t b1, float* dst) {
  const Table16 codes = load_table16(table);
  for (int64_t b = b0; b < b1; ++b)
    decode_block_avx2(packed + b * blocksize / 2, blocksize, scaled(codes, absmax[b]), dst + b * blocksize);
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const Codebook4& book = codebook(validate_quantize_4bit(A, blocksize, quant_type));
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  std::atomic<bool> non_finite{false};
  [[maybe_unused]] const CpuIsa isa = cpu_isa();

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
        const BlockScan scan = scan_block(src + start, len, vals);
        if (!scan.finite) non_finite.store(true, std::memory_order_relaxed);
        const float amax = amax_out[b] = scan.absmax;
        // Full blocks multiply by the reciprocal, a final partial block divides: that is exactly
        // what the reference (and bitsandbytes) computes, and on a tie it decides the code.
        const float denom = std::max(amax, kMinAbsmax);
        const float inv = 1.0f / denom;
        if (len == blocksize) {
#if LOWBIT_X86
          if (isa >= CpuIsa::avx512) {
            encode_full_block_avx512(vals, len, inv, book, codes);
          } else if (isa == CpuIsa::avx2) {
            encode_full_block_avx2(vals, len, inv, book, codes);
          } else
#endif
          for (int64_t i = 0; i < len; ++i) codes[i] = book.encode(std::clamp(mul_rn(vals[i], inv), -1.0f, 1.0f));
        } else {
          for (int64_t i = 0; i < len; ++i) codes[i] = book.encode(std::clamp(div_rn(vals[i], denom), -1.0f, 1.0f));
        }
        codes[len] = book.zero_code;  // pads the low nibble of a final odd element
        for (int64_t i = 0; i < len; i += 2) dst[(start + i) / 2] = pack_codes(codes[i], codes[i + 1]);
      }
    });
  });
  check_finite_input(!non_finite.load(), "lowbit.quantize_4bit");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const float* table =
      codebook(validate_dequantize_4bit(packed, absmax, blocksize, quant_type, c10::fromIntArrayRefSlow(shape), dtype))
          .value;
  const int64_t n = c10::multiply_integers(shape);
  const at::Tensor q = packed.contiguous();
  const at::Tensor scales = absmax.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t nblocks = scales.numel();
  [[maybe_unused]] const bool vectorized = cpu_isa() > CpuIsa::portable;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit", [&] {
    const uint8_t* src = q.const_data_ptr<uint8_t>();
    const float* amax = scales.const_data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
#if LOWBIT_X86
      // Vectorized: float32 output, every block but a final partial one.
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorized) {
          const int64_t full = std::min(b1, n / blocksize);
          dequantize_blocks_avx2(src, amax, table, blocksize, b0, full, reinterpret_cast<float*>(dst));
          b0 = std::max(b0, full);
        }
      }
#elif LOWBIT_ARM
      // Vectorized: float32 output, every block but a final partial one, as rows of one block each.
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorized) {
          const int64_t full = std::min(b1, n / blocksize);
          Weight4 blocks{};
          blocks.packed = src;
          blocks.N = full;
          blocks.K = blocks.blocksize = blocksize;
          std::copy(table, table + 16, blocks.table);
          blocks.absmax = amax;
          if (b0 < full) neon::decode_4bit_rows(blocks, b0, full, reinterpret_cast<float*>(dst) + b0 * blocksize);
          b0 = std::max(b0, full);
        }
      }
#endif
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const float scale = amax[b];
        for (int64_t i = start; i < start + len; ++i) dst[i] = static_cast<scalar_t>(mul_rn(table[code_at(src, i)], scale));
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

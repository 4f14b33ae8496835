// 4-bit blockwise quantization with a searched scale per block, on the CPU. Same output format as
// quantize_4bit (codes + one float32 scale per block), so anything that loads NF4/FP4 loads it.
//
// Plain quantization scales a block by its absmax. Here each block tries the scales absmax * r for r
// in `ratios`, keeps the one whose nearest codes give the smallest importance-weighted squared error
// sum_i h_i (v_i - s * c_i)^2, then refits that scale by least squares for the codes it chose
// (s* = sum h v c / sum h c^2) and keeps the refit if its own nearest codes do better. h is
// importance[i % K] (K = the last dimension: one weight per input channel, e.g. the mean squared
// activation, which makes the block error a diagonal estimate of the output error), or 1.
//
// The error and refit sums run in 16 lanes (block element i in lane i % 16, the lanes then added by
// halving, see lane_total), each product and sum separately rounded: the AVX-512 path, the portable path and
// reference.quantize_4bit_search compute the same floats, so all three pick the same scale and codes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/nibbles_avx2.h"
#include "formats.h"
#include "validate.h"

namespace lowbit {
namespace {

constexpr int kLanes = 16;

// The codebook laid out for a 4-step binary search over the 15 sorted midpoints: probe[s][j] is the
// midpoint the search compares with at step s when its index so far is j (probes beyond the last
// midpoint are never reached, since the index after steps of 8, 4, 2 is at most 14).
struct SearchBook {
  float sorted_value[16];
  float probe[4][16];
};

SearchBook search_book(const Codebook4& book) {
  SearchBook sb{};
  constexpr int kOffset[4] = {7, 3, 1, 0};  // probe bounds[idx + step - 1] for steps 8, 4, 2, 1
  for (int j = 0; j < 16; ++j) {
    sb.sorted_value[j] = book.sorted_value(j);
    for (int s = 0; s < 4; ++s) sb.probe[s][j] = book.bounds[std::min(j + kOffset[s], 14)];
  }
  return sb;
}

// One block, copied and padded with zeros (value 0, importance 0: they add exactly 0 to every sum)
// to a multiple of 16 elements.
struct Block {
  const float* v;
  const float* h;
  int64_t len;
};

// The 16 lane sums added by halving (lane i + lane i + 8, then i + 4, i + 2, i + 1): the order of the
// AVX-512 reduction below, four dependent adds instead of fifteen.
float lane_total(const float* lanes) {
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = lanes[l];
  for (int half = kLanes / 2; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) t[l] = add_rn(t[l], t[l + half]);
  }
  return t[0];
}

#if LOWBIT_X86
LOWBIT_AVX512 float lane_total_avx512(__m512 lanes) {
  const __m256 lo = _mm512_castps512_ps256(lanes);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
  const __m256 t8 = _mm256_add_ps(lo, hi);
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}
#endif

// Nearest sorted-code indices of the block at scale s (into idx) and their weighted squared error.
float encode_error_portable(const Block& b, float s, const Codebook4& book, const SearchBook& sb, uint8_t* idx) {
  const float inv = div_rn(1.0f, s);
  float lanes[kLanes] = {};
  for (int64_t i = 0; i < b.len; ++i) {
    const int k = book.sorted_index(std::clamp(mul_rn(b.v[i], inv), -1.0f, 1.0f));
    idx[i] = static_cast<uint8_t>(k);
    const float d = b.v[i] - mul_rn(s, sb.sorted_value[k]);
    lanes[i % kLanes] = add_rn(lanes[i % kLanes], mul_rn(b.h[i], mul_rn(d, d)));
  }
  return lane_total(lanes);
}

#if LOWBIT_X86
// The same, 16 elements at a time: the binary search is four table permutes and compares (cheaper than
// the 15 compares of quantize_4bit's count), the code value one more permute.
LOWBIT_AVX512 float encode_error_avx512(const Block& b, float s, const SearchBook& sb, uint8_t* idx) {
  const __m512 scale = _mm512_set1_ps(s), inv = _mm512_set1_ps(div_rn(1.0f, s));
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  const __m512 values = _mm512_loadu_ps(sb.sorted_value);
  __m512 probe[4];
  for (int p = 0; p < 4; ++p) probe[p] = _mm512_loadu_ps(sb.probe[p]);
  const __m512i step[4] = {_mm512_set1_epi32(8), _mm512_set1_epi32(4), _mm512_set1_epi32(2), _mm512_set1_epi32(1)};
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < b.len; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(b.v + i);
    const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi);
    __m512i k = _mm512_setzero_si512();
    for (int p = 0; p < 4; ++p) {
      const __mmask16 above = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, probe[p]), x, _CMP_LT_OQ);
      k = _mm512_mask_add_epi32(k, above, k, step[p]);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + i), _mm512_cvtepi32_epi8(k));
    const __m512 d = _mm512_sub_ps(v, _mm512_mul_ps(scale, _mm512_permutexvar_ps(k, values)));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(b.h + i), _mm512_mul_ps(d, d)));
  }
  return lane_total_avx512(acc);
}
#endif

#if LOWBIT_X86
// AVX2: the 16 lanes as two vectors (block elements i..i+7 in lanes 0-7, i+8..i+15 in lanes 8-15), added by
// halving in lane_total's order: lanes + lanes 8 on, then 4, 2, 1.
LOWBIT_AVX2 float lane_total_avx2(__m256 lanes_low, __m256 lanes_high) {
  const __m256 t8 = _mm256_add_ps(lanes_low, lanes_high);
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

// The binary search and error of encode_error_avx512, 8 lanes at a time; the 16-entry tables are looked up in
// two halves (lookup16).
LOWBIT_AVX2 float encode_error_avx2(const Block& b, float s, const SearchBook& sb, uint8_t* idx) {
  const __m256 scale = _mm256_set1_ps(s), inv = _mm256_set1_ps(div_rn(1.0f, s));
  const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
  const Table16 values = load_table16(sb.sorted_value);
  Table16 probe[4];
  for (int p = 0; p < 4; ++p) probe[p] = load_table16(sb.probe[p]);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < b.len; i += 8) {
    const __m256 v = _mm256_loadu_ps(b.v + i);
    const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, inv), lo), hi);
    __m256i k = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {
      const __m256 above = _mm256_cmp_ps(lookup16(k, probe[p]), x, _CMP_LT_OQ);
      k = _mm256_add_epi32(k, _mm256_and_si256(_mm256_castps_si256(above), _mm256_set1_epi32(8 >> p)));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), k);
    for (int j = 0; j < 8; ++j) idx[i + j] = static_cast<uint8_t>(lanes[j]);
    const __m256 d = _mm256_sub_ps(v, _mm256_mul_ps(scale, lookup16(k, values)));
    acc[(i / 8) % 2] = _mm256_add_ps(acc[(i / 8) % 2], _mm256_mul_ps(_mm256_loadu_ps(b.h + i), _mm256_mul_ps(d, d)));
  }
  return lane_total_avx2(acc[0], acc[1]);
}
#endif

// Least-squares scale for fixed codes from its sums, or 0 when there is none (all codes zero, no
// importance, or a negative fit).
float least_squares_scale(float num, float den) {
  const float s = den > 0.f && num > 0.f ? div_rn(num, den) : 0.f;
  return std::isfinite(s) && s >= kMinAbsmax ? s : 0.f;
}

float refit_scale_portable(const Block& b, const SearchBook& sb, const uint8_t* idx) {
  float num[kLanes] = {}, den[kLanes] = {};
  for (int64_t i = 0; i < b.len; ++i) {
    const float c = sb.sorted_value[idx[i]];
    num[i % kLanes] = add_rn(num[i % kLanes], mul_rn(b.h[i], mul_rn(b.v[i], c)));
    den[i % kLanes] = add_rn(den[i % kLanes], mul_rn(b.h[i], mul_rn(c, c)));
  }
  return least_squares_scale(lane_total(num), lane_total(den));
}

#if LOWBIT_X86
LOWBIT_AVX512 float refit_scale_avx512(const Block& b, const SearchBook& sb, const uint8_t* idx) {
  const __m512 values = _mm512_loadu_ps(sb.sorted_value);
  __m512 num = _mm512_setzero_ps(), den = _mm512_setzero_ps();
  for (int64_t i = 0; i < b.len; i += kLanes) {
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + i)));
    const __m512 c = _mm512_permutexvar_ps(k, values), h = _mm512_loadu_ps(b.h + i);
    num = _mm512_add_ps(num, _mm512_mul_ps(h, _mm512_mul_ps(_mm512_loadu_ps(b.v + i), c)));
    den = _mm512_add_ps(den, _mm512_mul_ps(h, _mm512_mul_ps(c, c)));
  }
  return least_squares_scale(lane_total_avx512(num), lane_total_avx512(den));
}
#endif

#if LOWBIT_X86
LOWBIT_AVX2 float refit_scale_avx2(const Block& b, const SearchBook& sb, const uint8_t* idx) {
  const Table16 values = load_table16(sb.sorted_value);
  __m256 num[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, den[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < b.len; i += 8) {
    int64_t codes;
    std::memcpy(&codes, idx + i, 8);
    const __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(codes));
    const __m256 c = lookup16(k, values), h = _mm256_loadu_ps(b.h + i);
    const int lane_half = (i / 8) % 2;
    num[lane_half] = _mm256_add_ps(num[lane_half], _mm256_mul_ps(h, _mm256_mul_ps(_mm256_loadu_ps(b.v + i), c)));
    den[lane_half] = _mm256_add_ps(den[lane_half], _mm256_mul_ps(h, _mm256_mul_ps(c, c)));
  }
  return least_squares_scale(lane_total_avx2(num[0], num[1]), lane_total_avx2(den[0], den[1]));
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_4bit_search_cpu(const at::Tensor& A, int64_t blocksize,
                                                            c10::string_view quant_type, at::ArrayRef<double> ratios,
                                                            const std::optional<at::Tensor>& importance) {
  const Codebook4& book = codebook(validate_quantize_4bit_search(A, blocksize, quant_type, ratios, importance));
  const SearchBook sb = search_book(book);
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const at::Tensor h = importance.has_value() ? importance->contiguous() : at::Tensor();
  const float* weights = h.defined() ? h.const_data_ptr<float>() : nullptr;
  const int64_t period = h.defined() ? h.numel() : 1;
  if (weights) {
    const float* end = weights + period;
    TORCH_CHECK_VALUE(std::all_of(weights, end, [](float w) { return std::isfinite(w) && w >= 0.f; }),
                      "lowbit.quantize_4bit_search: importance must be finite and >= 0");
  }
  std::vector<float> candidates(ratios.begin(), ratios.end());
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, a.options().dtype(at::kFloat));
  std::atomic<bool> non_finite{false};
  [[maybe_unused]] const CpuIsa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quantize_4bit_search", [&] {
    const scalar_t* src = a.const_data_ptr<scalar_t>();
    uint8_t* dst = packed.data_ptr<uint8_t>();
    float* scale_out = absmax.data_ptr<float>();
    // Each block costs (ratios + 1) encodes, so fewer blocks per task than quantize_4bit balances better.
    at::parallel_for(0, nblocks, std::max<int64_t>(1, 4096 / blocksize), [&](int64_t b0, int64_t b1) {
      float v[kMaxBlocksize], hv[kMaxBlocksize];
      uint8_t idx_a[kMaxBlocksize], idx_b[kMaxBlocksize];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t start = blk * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const int64_t padded = (len + kLanes - 1) / kLanes * kLanes;
        float amax = 0.f;
        bool finite = true;
        for (int64_t i = 0; i < len; ++i) {
          v[i] = static_cast<float>(src[start + i]);
          amax = std::max(amax, std::abs(v[i]));
          finite &= std::isfinite(v[i]);
        }
        std::fill(v + len, v + padded, 0.f);
        if (!finite) non_finite.store(true, std::memory_order_relaxed);
        // The block's importance: read in place when the block lies within one row of A (any full block
        // when blocksize divides K), else gathered; the padding weighs nothing.
        const int64_t column = start % period;
        const float* h = hv;
        if (weights && len == padded && column + len <= period) {
          h = weights + column;
        } else {
          for (int64_t i = 0, c = column; i < len; ++i, c = c + 1 == period ? 0 : c + 1) hv[i] = weights ? weights[c] : 1.f;
          std::fill(hv + len, hv + padded, 0.f);
        }

        uint8_t* best = idx_a;
        uint8_t* trial = idx_b;
        float best_scale = 0.f;
        if (amax > 0.f && finite) {
          const Block b{v, h, padded};
          auto encode_error = [&](float s, uint8_t* idx) {
#if LOWBIT_X86
            if (isa >= CpuIsa::avx512) return encode_error_avx512(b, s, sb, idx);
            if (isa == CpuIsa::avx2) return encode_error_avx2(b, s, sb, idx);
#endif
            return encode_error_portable(b, s, book, sb, idx);
          };
          auto refit_scale = [&](const uint8_t* idx) {
#if LOWBIT_X86
            if (isa >= CpuIsa::avx512) return refit_scale_avx512(b, sb, idx);
            if (isa == CpuIsa::avx2) return refit_scale_avx2(b, sb, idx);
#endif
            return refit_scale_portable(b, sb, idx);
          };
          float best_error = std::numeric_limits<float>::infinity();
          // The first candidate is taken whatever its error (even infinite), later ones only if strictly
          // better: ties keep the earlier ratio.
          for (size_t r = 0; r < candidates.size(); ++r) {
            const float s = std::max(mul_rn(amax, candidates[r]), kMinAbsmax);
            const float e = encode_error(s, trial);
            if (r == 0 || e < best_error) {
              best_error = e;
              best_scale = s;
              std::swap(best, trial);
            }
          }
          const float refit = refit_scale(best);
          if (refit > 0.f && encode_error(refit, trial) < best_error) {
            best_scale = refit;
            std::swap(best, trial);
          }
        } else {
          std::fill(best, best + padded, static_cast<uint8_t>(book.sorted_index(0.f)));
        }
        scale_out[blk] = best_scale;
        uint8_t codes[kMaxBlocksize + 1];
        for (int64_t i = 0; i < len; ++i) codes[i] = book.code_of_sorted[best[i]];
        codes[len] = book.zero_code;  // pads the low nibble of a final odd element
        for (int64_t i = 0; i < len; i += 2) dst[(start + i) / 2] = pack_codes(codes[i], codes[i + 1]);
      }
    });
  });
  check_finite_input(!non_finite.load(), "lowbit.quantize_4bit_search");
  return {packed, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("quantize_4bit_search", &quantize_4bit_search_cpu); }

}  // namespace lowbit

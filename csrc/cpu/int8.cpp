// LLM.int8() on the CPU: per-row absmax int8 activations, an exact int8 x int8 -> int32 matmul
// against the row-quantized weight, and the outlier columns kept in float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/avx2.h"
#include "cpu/gemm_slabs.h"
#include "cpu/int8_gemm_avx2.h"
#include "cpu/int8_neon.h"
#include "cpu/isa.h"
#include "rows.h"
#include "validate.h"

namespace lowbit {
namespace {

// Above this many rows a GEMM (at::_int_mm with VNNI, lowbit's own on AVX2 and Arm, the float GEMM on the portable
// level) wins over the GEMV kernels below.
constexpr int64_t kMaxGemvRows = 8;

struct RowQuantized {
  at::Tensor q;             // int8 [M, K]
  at::Tensor row_stats;     // float32 [M]
  at::Tensor outlier_cols;  // int64 [n_outliers]
};

// std::nearbyint for |v| <= 2^22 in the default rounding mode (round half to even), without its library call: adding
// and subtracting 1.5 * 2^23 leaves v rounded to an integer by the FPU's own rounding. On the portable level
// (SSE2 has no roundps) nearbyint was a library call per element: int8_vectorwise_quant of 512 x 4096 took 4.0 ms
// against 1.5 ms this way (2-core Sapphire Rapids VM forced to the portable level, 2026-12-05).
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;  // (not folded to v: without -ffast-math the compiler keeps both roundings)
}

// dst[k] = round_half_even(scaled(xr[k])), 0 in outlier columns (whose values may be beyond int8, or infinite).
template <typename Scale>
void quantize_row_portable(const float* xr, int64_t K, const Scale& scaled, const uint8_t* outlier, int8_t* dst) {
  for (int64_t k = 0; k < K; ++k) {
    const float v = round_half_even(scaled(xr[k]));
    dst[k] = (outlier && outlier[k]) ? 0 : static_cast<int8_t>(static_cast<int32_t>(v));
  }
}

#if LOWBIT_X86
// One row's absmax over its non-outlier elements (|x| >= thr, when thresholded) into *amax, 8 at a time; returns
// whether every non-outlier element is finite (a NaN fails both compares, so it is never an outlier).
LOWBIT_AVX2 bool row_absmax_avx2(const float* xr, int64_t K, bool thresholded, float thr, float* amax) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 threshold = _mm256_set1_ps(thr), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vmax = _mm256_setzero_ps();
  int finite = 0xFF;
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask);
    const __m256 outlier = thresholded ? _mm256_cmp_ps(a, threshold, _CMP_GE_OQ) : _mm256_setzero_ps();
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(outlier, a));
    finite &= _mm256_movemask_ps(_mm256_or_ps(outlier, _mm256_cmp_ps(a, inf, _CMP_LT_OQ)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = 0.f;
  for (float v : lanes) m = std::max(m, v);
  bool all_finite = finite == 0xFF;
  for (int64_t k = K8; k < K; ++k) {
    const float a = std::abs(xr[k]);
    const bool is_outlier = thresholded && a >= thr;
    if (!is_outlier) m = std::max(m, a);
    all_finite &= is_outlier || std::isfinite(a);
  }
  *amax = m;
  return all_finite;
}

// dst[k] = round_half_even(xr[k] * s), 0 in outlier columns; vcvtps2dq rounds half to even as std::nearbyint does
// in the default rounding mode, so the codes are the scalar loop's.
LOWBIT_AVX2 void quantize_row_avx2(const float* xr, int64_t K, float s, const uint8_t* outlier, int8_t* dst) {
  const __m256 scale = _mm256_set1_ps(s);
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), scale));
    if (outlier) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(outlier + k)));
      q = _mm256_and_si256(q, _mm256_cmpeq_epi32(flags, _mm256_setzero_si256()));
    }
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + k), _mm_packs_epi16(words, words));
  }
  for (int64_t k = K8; k < K; ++k) dst[k] = (outlier && outlier[k]) ? 0 : static_cast<int8_t>(std::nearbyint(xr[k] * s));
}
#endif

// flags[k] |= |x[m, k]| >= thr over rows [0, M) and columns [k0, k1): one pass over x, row by row, that the
// compiler vectorizes for the caller's instruction set (a NaN compares false, so it is never an outlier). Replaces
// (x.abs() >= thr).any(0), three ATen passes with two M x K temporaries and a strided reduction, which cost as much
// as the int8 product itself on the built-in model's k/v projection (192 x 576).
[[gnu::always_inline]] inline void mark_outlier_columns(const float* x, int64_t M, int64_t K, float thr, int64_t k0,
                                                        int64_t k1, uint8_t* flags) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t k = k0; k < k1; ++k) flags[k] |= static_cast<uint8_t>(std::abs(xr[k]) >= thr);
  }
}
#if LOWBIT_X86
LOWBIT_AVX2 void mark_outlier_columns_avx2(const float* x, int64_t M, int64_t K, float thr, int64_t k0, int64_t k1,
                                           uint8_t* flags) {
  mark_outlier_columns(x, M, K, thr, k0, k1, flags);
}
#endif

// x: float32 [M, K], contiguous.
RowQuantized quantize_rows(const at::Tensor& x, double threshold) {
  const int64_t M = x.size(0), K = x.size(1);
  const float thr = static_cast<float>(threshold);
  at::Tensor col_is_outlier;
  at::Tensor outlier_cols = at::empty({0}, x.options().dtype(at::kLong));
  [[maybe_unused]] const bool avx2 = cpu_isa() >= CpuIsa::avx2;
  if (threshold > 0 && x.numel() > 0) {
    col_is_outlier = at::zeros({K}, x.options().dtype(at::kByte));
    const float* xp = x.const_data_ptr<float>();
    uint8_t* flags = col_is_outlier.data_ptr<uint8_t>();
    // Threads take column ranges (a multiple of 64 bytes of flags, so no two write one cache line).
    at::parallel_for(0, (K + 63) / 64, std::max<int64_t>(1, 4096 / std::max<int64_t>(M, 1)), [&](int64_t c0, int64_t c1) {
      const int64_t k0 = c0 * 64, k1 = std::min(K, c1 * 64);
#if LOWBIT_X86
      if (avx2) return mark_outlier_columns_avx2(xp, M, K, thr, k0, k1, flags);
#endif
      mark_outlier_columns(xp, M, K, thr, k0, k1, flags);
    });
    outlier_cols = at::nonzero(col_is_outlier).view(-1);
  }
  const uint8_t* outlier = outlier_cols.numel() > 0 ? col_is_outlier.const_data_ptr<uint8_t>() : nullptr;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor row_stats = at::empty({M}, x.options());
  const float* src = x.const_data_ptr<float>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* stats = row_stats.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = src + m * K;
      // Outlier elements do not count towards the row's scale (their columns go through float).
      float amax = 0.f;
      bool finite = true;
#if LOWBIT_X86
      if (avx2) finite = row_absmax_avx2(xr, K, threshold > 0, thr, &amax);
      else
#endif
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::abs(xr[k]);
        // An Inf at or above the threshold is an outlier element, computed in float; a NaN never is, even in
        // a column another row made an outlier column (as in the reference).
        const bool is_outlier = threshold > 0 && a >= thr;
        if (!is_outlier) amax = std::max(amax, a);
        finite &= is_outlier || std::isfinite(a);
      }
      if (!finite) {
        // A NaN/Inf that is not an outlier: the row's result must be NaN, as in F.linear.
        stats[m] = std::numeric_limits<float>::quiet_NaN();
        std::fill(dst + m * K, dst + (m + 1) * K, int8_t{0});
        continue;
      }
      stats[m] = amax;
      // (1 / absmax) * 127, then multiply, then round half to even: exactly the reference's (and
      // bitsandbytes') float32 arithmetic, so int8 codes match bit for bit. A subnormal absmax
      // overflows the reciprocal; such rows divide instead.
      const float s = amax > 0 ? (1.0f / amax) * 127.0f : 0.f;
      const bool divide = !std::isfinite(s);
#if LOWBIT_X86
      if (avx2 && !divide) {
        quantize_row_avx2(xr, K, s, outlier, dst + m * K);
        continue;
      }
#endif
      if (divide) {
        quantize_row_portable(xr, K, [&](float v) { return v / amax * 127.0f; }, outlier, dst + m * K);
      } else {
        quantize_row_portable(xr, K, [&](float v) { return v * s; }, outlier, dst + m * K);
      }
    }
  });
  return {q, row_stats, outlier_cols};
}

void int8_gemv_portable(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* out) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += int32_t(a[m * K + k]) * int32_t(b[n * K + k]);
        out[m * N + n] = acc;
      }
  });
}

#if LOWBIT_X86
// The activations are widened to int16 once per call; each weight row is widened 32 bytes at a
// time and vpmaddwd multiplies and pair-adds into int32 lanes (no overflow: |pair| <= 2 * 127^2).
LOWBIT_AVX512 void int8_gemv_avx512_rows(const int16_t* a16, const int8_t* b, int64_t M, int64_t N, int64_t K,
                                          int32_t* out, int64_t n0, int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = b + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* am = a16 + m * K;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t k = 0; k < K32; k += 32) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512(am + k)));
      }
      int32_t total = _mm512_reduce_add_epi32(acc);
      for (int64_t k = K32; k < K; ++k) total += int32_t(am[k]) * int32_t(row[k]);
      out[m * N + n] = total;
    }
  }
}

// AVX2: the same with 16 weights per vpmaddwd, the weight stream prefetched 2 KiB ahead in software (left to the
// hardware prefetcher one thread is latency-bound, as in int8_weight_linear's GEMV).
LOWBIT_AVX2 void int8_gemv_avx2_rows(const int16_t* a16, const int8_t* b, int64_t M, int64_t N, int64_t K,
                                     int32_t* out, int64_t n0, int64_t n1) {
  constexpr int64_t kPrefetchBytes = 2048;
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = b + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* am = a16 + m * K;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t k = 0; k < K16; k += 16) {
        if (m == 0 && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am + k))));
      }
      int32_t total = horizontal_sum(acc);
      for (int64_t k = K16; k < K; ++k) total += int32_t(am[k]) * int32_t(row[k]);
      out[m * N + n] = total;
    }
  }
}

// The GEMV for the rows of x up to kMaxGemvRows, widening them to int16 once per call.
template <typename Rows>
void int8_gemv(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* out, const Rows& rows) {
  std::vector<int16_t> a16(a, a + M * K);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { rows(a16.data(), b, M, N, K, out, n0, n1); });
}

// Whether at::_int_mm is exact here. Its oneDNN kernels are only where the CPU (and oneDNN, which
// ONEDNN_MAX_CPU_ISA can cap) has VNNI: without it they multiply through vpmaddubsw, whose int16 pair sums saturate,
// and return wrong sums (measured 2026-12-05, torch 2.13 on Sapphire Rapids with ONEDNN_MAX_CPU_ISA=AVX2 or
// AVX512_CORE: off by up to 3e5 on 512 x 576 x 192; exact with AVX2_VNNI or AVX512_CORE_VNNI). That is why LLM.int8()
// scored differently on AVX2 CPUs. So it is tried once per process on a product that saturates vpmaddubsw (every
// pair 127 x 127 or -128 x 127), and used only if it is exact there.
bool int_mm_is_exact() {
  static const bool exact = [] {
    constexpr int64_t M = 32, K = 256, N = 32;
    const at::Tensor a = at::full({M, K}, 127, at::dtype(at::kChar));
    a.slice(0, 0, M / 2).fill_(-128);
    const at::Tensor b = at::full({K, N}, 127, at::dtype(at::kChar));
    const at::Tensor want = at::full({M, N}, 127 * 127 * K, at::dtype(at::kInt));
    want.slice(0, 0, M / 2).fill_(-128 * 127 * K);
    return at::equal(at::_int_mm(a, b), want);
  }();
  return exact;
}

// Whether at::_int_mm is the faster many-rows product: where the CPU has VNNI (vpdpbusd: 4 products summed per
// lane per instruction), AVX-512 VNNI or the AVX2-width AVX-VNNI of Intel's client cores from Alder Lake on, it is,
// and exact. Measured 2026-12-05 on Sapphire Rapids, 2 threads, against fp32 F.linear with MKL at AVX2: oneDNN
// capped to AVX2_VNNI (what an Alder Lake runs) 2.4-3.8x on 64-512 rows of 192 x 576 to 4096 x 4096, where lowbit's
// vpmaddwd GEMM runs 1.0-1.25x; with AVX-512 VNNI 3.9-5.3x (2026-11-29). Without VNNI lowbit's own GEMM runs.
bool int_mm_is_fast() {
  static const bool vnni = __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni");
  return vnni && cpu_isa() >= CpuIsa::avx2 && int_mm_is_exact();
}

#endif

// The portable level's many-rows product, exact through the BLAS float GEMM: an int8 product is exact in float32
// (|p| <= 2^14), and so is every partial sum of up to 1024 of them (|sum| <= 2^24), in any order and with FMAs; so
// each 1024-wide slice of K is one exact GEMM, and the slices add in int32. The CPU's BLAS runs at its fp32 speed.
// The weight is widened to float a slab at a time (gemm_slabs): widening all of it at once wrote 4 bytes per weight
// to fresh memory each call, and took twice fp32's time at 16 rows (4096 x 4096: 27.4 against 12.5 ms, 2026-12-05).
at::Tensor int8_matmul_through_float_gemm(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kExactSlice = 1024;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  const at::Tensor af = a.to(at::kFloat);
  at::Tensor out = at::zeros({M, N}, a.options().dtype(at::kInt));
  const int8_t* bp = b.const_data_ptr<int8_t>();
  gemm_slabs(
      N, K, af, out,
      [&](int64_t n0, int64_t n1, float* dst) {
        for (int64_t i = 0; i < (n1 - n0) * K; ++i) dst[i] = static_cast<float>(bp[n0 * K + i]);
      },
      [&](at::Tensor out_part, const at::Tensor& x, const at::Tensor& slab) {
        for (int64_t k0 = 0; k0 < K; k0 += kExactSlice) {
          const int64_t k1 = std::min(K, k0 + kExactSlice);
          out_part.add_(at::mm(x.slice(1, k0, k1), slab.slice(1, k0, k1).t()).to(at::kInt));
        }
      });
  return out;
}

// a: int8 [M, K], b: int8 [N, K], both contiguous -> int32 [M, N].
at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
#if LOWBIT_X86
  // at::_int_mm returned wrong sums for K == 1 on the CPU (torch 2.13); tiny K is cheap here anyway.
  if (M > kMaxGemvRows && K >= 16 && N > 0 && int_mm_is_fast()) return at::_int_mm(a, b.t());
#endif
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int8_t* bp = b.const_data_ptr<int8_t>();
  int32_t* o = out.data_ptr<int32_t>();
#if LOWBIT_X86
  const CpuIsa isa = cpu_isa();
  if (M > kMaxGemvRows && isa >= CpuIsa::avx2) {
    int8_gemm_avx2(ap, bp, M, N, K, o);
  } else if (isa >= CpuIsa::avx512) {
    int8_gemv(ap, bp, M, N, K, o, int8_gemv_avx512_rows);
  } else if (isa == CpuIsa::avx2) {
    int8_gemv(ap, bp, M, N, K, o, int8_gemv_avx2_rows);
  } else
#elif LOWBIT_ARM
  // Any number of rows: the NEON product is a tiled GEMM (int8_neon.h); at::_int_mm's speed on Arm is unmeasured.
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::dotprod) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { neon::int8_gemm_dotprod(ap, bp, M, N, K, o, n0, n1); });
  } else if (isa == CpuIsa::neon) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { neon::int8_gemm(ap, bp, M, N, K, o, n0, n1); });
  } else
#endif
  if (M > kMaxGemvRows) {
    return int8_matmul_through_float_gemm(a, b);
  } else {
    int8_gemv_portable(ap, bp, M, N, K, o);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cpu(const at::Tensor& A, double threshold) {
  validate_int8_vectorwise_quant(A, threshold);
  RowQuantized r = quantize_rows(flatten_rows(A).to(at::kFloat).contiguous(), threshold);
  return {r.q.view(A.sizes()), r.row_stats, r.outlier_cols};
}

at::Tensor int8_mm_cpu(const at::Tensor& A, const at::Tensor& B) {
  validate_int8_mm(A, B);
  return int8_matmul(A.contiguous(), B.contiguous());
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                           const std::optional<at::Tensor>& bias) {
  validate_int8_linear(x, CB, SCB, threshold, bias);
  const int64_t N = CB.size(0);
  const at::Tensor x2 = flatten_rows(x).to(at::kFloat).contiguous();
  const at::Tensor w = CB.contiguous();
  const at::Tensor wscale = SCB.contiguous();
  const int64_t M = x2.size(0);
  RowQuantized r = quantize_rows(x2, threshold);
  const at::Tensor acc = int8_matmul(r.q, w);

  // out = (acc * row_scale) * (weight_scale / 127^2), fused in one pass over the int32 result. The 1 / 127^2 goes
  // with the weight's scale, never with the row's: a row of subnormal activations has a subnormal absmax, and
  // scaling that down further lost most of its bits (3.5% error against the reference's 0.75%).
  at::Tensor out = at::empty({M, N}, x2.options());
  const at::Tensor weight_scale = wscale.to(at::kFloat) / (127.0f * 127.0f);
  const int32_t* a = acc.const_data_ptr<int32_t>();
  const float* rs = r.row_stats.const_data_ptr<float>();
  const float* ws = weight_scale.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t n = 0; n < N; ++n) o[m * N + n] = (static_cast<float>(a[m * N + n]) * rs[m]) * ws[n];
    }
  });
  if (r.outlier_cols.numel() > 0) {
    // The few outlier columns in float against the dequantized weight columns. Each output sums its columns in
    // one order, on one thread, then adds to the int8 part: a BLAS call (addmm) splits the sums differently by
    // thread count, and lowbit's results must not depend on it. Vectorized across the outputs of a row.
    const int64_t n_out = r.outlier_cols.numel();
    const at::Tensor x_cols = x2.index_select(1, r.outlier_cols).contiguous();  // [M, n_out]
    const at::Tensor w_cols = (w.index_select(1, r.outlier_cols).to(at::kFloat) * (wscale / 127.0f).unsqueeze(1))
                                  .t()
                                  .contiguous();  // [n_out, N]
    const float* xc = x_cols.const_data_ptr<float>();
    const float* wc = w_cols.const_data_ptr<float>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      std::vector<float> sums(N);
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t j = 0; j < n_out; ++j) {
          const float xv = xc[m * n_out + j];
          const float* wrow = wc + j * N;
          for (int64_t n = 0; n < N; ++n) sums[n] += xv * wrow[n];
        }
        for (int64_t n = 0; n < N; ++n) o[m * N + n] += sums[n];
      }
    });
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type()).view(linear_output_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_vectorwise_quant", &int8_vectorwise_quant_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace lowbit

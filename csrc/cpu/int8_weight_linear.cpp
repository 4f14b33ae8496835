// y = x @ (CB * SCB / 127).T + bias on the CPU: the int8 weight of LLM.int8() with activations kept in
// float (weight-only int8). Unlike int8_linear, nothing rounds x, so the only error is the weight's.
//
// Few rows (decode): the weight is read once and each byte serves M multiply-adds, so the kernel streams
// it: 16 int8 weights widened to float32 in registers (vpmovsxbd + vcvtdq2ps), one FMA per row of x, the
// row scale SCB / 127 applied once per output. Many rows: on a CPU with AMX-BF16, bfloat16 tiles with exact
// products (amx_int8_weight.h: faster than fp32's own GEMM); otherwise, or for inputs outside the tiles'
// exact range, decode panels of weight rows into lowbit's own AVX-512 or AVX2 GEMM (panel_gemm.h,
// panel_gemm_avx2.h), or on the portable level slabs for the BLAS GEMM (gemm_slabs.h), amortizing the decode over
// the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/amx_int8_weight.h"
#include "cpu/avx2.h"
#include "cpu/dot.h"
#include "cpu/gemm_slabs.h"
#include "cpu/int8_neon.h"
#include "cpu/isa.h"
#include "cpu/panel_gemm.h"
#include "cpu/panel_gemm_avx2.h"
#include "cpu/row_groups.h"
#include "rows.h"
#include "validate.h"

namespace lowbit {
namespace {

// Up to this many rows of x the GEMV kernels run; beyond, the panel GEMM (AVX-512) or the slab GEMM. Below 16
// rows the reference's BLAS sums more accurately than the panel GEMM's chunked sums (see linear_4bit.cpp).
constexpr int64_t kMaxGemvRows = 16;
// Where the CPU has AMX, the tile kernel takes over from the GEMV sooner, at any weight size. Measured
// 2026-11-29 on a 2-core Sapphire Rapids VM, weights in cache, against fp32 F.linear (AMX / GEMV): at 16 rows
// 576 x 576 1.15x / 0.88x, 1536 x 576 1.63x / 0.97x, 4096 x 4096 2.68x / 1.16x, 192 x 576 0.74x / 0.83x; at 8
// rows 576 x 576 0.96x / 1.26x, 4096 x 4096 2.22x / 2.01x. Against the slab path, AMX won on every shape tried,
// down to 128 x 128 at 32 rows (0.77x / 0.51x).
constexpr int64_t kMaxGemvRowsBeforeAmx = 8;
// The portable GEMV (a dot product per row of x and weight row) hands over to the slab GEMM sooner: from 9 rows the
// BLAS GEMM on widened slabs is the faster (measured 2026-12-05, Sapphire Rapids VM forced to the portable level,
// MKL capped at SSE4.2; see BENCHMARKS.md), and being the BLAS it sums as accurately as the reference.
constexpr int64_t kMaxPortableGemvRows = 8;

// Rows [n0, n1) of the weight as float32, scales applied.
void decode_rows(const int8_t* CB, const float* scale, int64_t K, int64_t n0, int64_t n1, float* dst) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) dst[(n - n0) * K + k] = static_cast<float>(CB[n * K + k]) * scale[n];
}

#if LOWBIT_X86
// Weight rows [n0, n0 + rows), rows <= 32, scaled, for panel_gemm: panel[k * 32 + r] = CB[n0 + r, k] * scale,
// zero from row `rows` on; the same float products as decode_rows. Byte e of a dword is sign-extended by
// shifting it to the top and back.
LOWBIT_AVX512 void decode_int8_panel(const int8_t* CB, const float* scale, int64_t K, int64_t n0, int64_t rows,
                                     float* panel) {
  const int64_t K16 = K / 16 * 16;
  for (int half = 0; half < 2; ++half) {
    const int64_t first = n0 + 16 * half;
    const int valid = static_cast<int>(std::clamp<int64_t>(rows - 16 * half, 0, 16));
    alignas(64) float scales[16] = {};
    for (int r = 0; r < valid; ++r) scales[r] = scale[first + r];
    const __m512 s = _mm512_load_ps(scales);
    for (int64_t k0 = 0; k0 < K16; k0 += 16) {
      __m512i columns[4];
      byte_columns(reinterpret_cast<const uint8_t*>(CB + first * K + k0), K, valid, columns);
      float* dst = panel + k0 * kPanelRows + 16 * half;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c)
#pragma GCC unroll 4
        for (int e = 0; e < 4; ++e) {
          const __m512i value = _mm512_srai_epi32(_mm512_slli_epi32(columns[c], 24 - 8 * e), 24);
          _mm512_store_ps(dst + (4 * c + e) * kPanelRows, _mm512_mul_ps(_mm512_cvtepi32_ps(value), s));
        }
    }
    for (int64_t k = K16; k < K; ++k)
      for (int r = 0; r < 16; ++r)
        panel[k * kPanelRows + 16 * half + r] =
            r < valid ? static_cast<float>(CB[(first + r) * K + k]) * scales[r] : 0.f;
  }
}
#endif

void gemv_portable(const int8_t* CB, const float* scale, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = dot(CB + n * K, x + m * K, K) * scale[n];
  });
}

#if LOWBIT_X86
// How far ahead of the FMAs the GEMV asks for weight bytes. The hardware prefetcher alone left one thread at
// ~9 GB/s of weight, latency-bound; measured 2026-11-29 (2-core Sapphire Rapids VM, M = 1, 4096 x 4096 /
// 14336 x 4096): no prefetch 1.07 / 3.51 ms, 512 B 0.95 / 3.17, 2 KiB 0.81-0.83 / 2.69-2.92, 4 KiB 0.85 / 2.93,
// 8 KiB 0.93 / 3.18.
constexpr int64_t kPrefetchBytes = 2048;

LOWBIT_AVX512 inline __m512 int8x16_to_float(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// MT rows of x at a time, so their accumulators stay in registers. Each row keeps 4 / MT independent
// accumulators (one for MT >= 3): an FMA takes 4 cycles, so a single chain per row would let one row of x
// use a quarter of the FMA throughput, and at M = 1 the kernel would be bound by that chain, not by memory.
template <int MT>
LOWBIT_AVX512 void gemv_avx512_rows(const int8_t* CB, const float* scale, const float* x, int64_t N, int64_t K,
                                    float* out, int64_t n0, int64_t n1) {
  constexpr int U = MT >= 3 ? 1 : 4 / MT;
  const int64_t K_unrolled = K / (16 * U) * (16 * U), K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = CB + n * K;
    __m512 acc[MT][U];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K_unrolled; k += 16 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m512 w = int8x16_to_float(row + k + 16 * u);
        for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
      }
    }
    for (int64_t k = K_unrolled; k < K16; k += 16) {
      const __m512 w = int8x16_to_float(row + k);
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MT; ++m) {
      for (int u = 1; u < U; ++u) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][u]);
      float total = _mm512_reduce_add_ps(acc[m][0]);
      for (int64_t k = K16; k < K; ++k) total += static_cast<float>(row[k]) * x[m * K + k];
      out[m * N + n] = total * scale[n];
    }
  }
}

void gemv_avx512(const int8_t* CB, const float* scale, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for_each_row_group<4>(M, [&](auto rows, int64_t m) {
      gemv_avx512_rows<rows>(CB, scale, x + m * K, N, K, out + m * N, n0, n1);
    });
  });
}

// AVX2: the same GEMV with 8 weights per step (vpmovsxbd + vcvtdq2ps), MT <= 4 rows of x, each with 4 / MT
// accumulators for the same reason as above, and at least 2: with one 8-lane chain per row, each lane summed K / 8
// products in a row, twice the AVX-512 GEMV's run, and at K = 1025 it erred beyond the tests' bound (twice the
// reference's error; test_weight_only_int8_keeps_activations_in_float with the AVX2 kernels, every run); two
// chains give it the AVX-512 GEMV's 16 partial sums. AVX2's 16 registers hold 4 rows' 8 accumulators, the weights
// and x.
LOWBIT_AVX2 inline __m256 int8x8_to_float(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int MT>
LOWBIT_AVX2 void gemv_avx2_rows(const int8_t* CB, const float* scale, const float* x, int64_t N, int64_t K,
                                float* out, int64_t n0, int64_t n1) {
  constexpr int U = MT >= 3 ? 2 : 4 / MT;
  const int64_t K_unrolled = K / (8 * U) * (8 * U), K8 = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = CB + n * K;
    __m256 acc[MT][U];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K_unrolled; k += 8 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m256 w = int8x8_to_float(row + k + 8 * u);
        for (int m = 0; m < MT; ++m) acc[m][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
      }
    }
    for (int64_t k = K_unrolled; k < K8; k += 8) {
      const __m256 w = int8x8_to_float(row + k);
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MT; ++m) {
      for (int u = 1; u < U; ++u) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][u]);
      float total = horizontal_sum(acc[m][0]);
      for (int64_t k = K8; k < K; ++k) total += static_cast<float>(row[k]) * x[m * K + k];
      out[m * N + n] = total * scale[n];
    }
  }
}

// Every group of 4 rows of x passes over a tile of 16 weight rows before the next tile is read, so from 5 rows on
// the weight is re-read from L1/L2, not from memory (16 rows of K = 4096 are 64 KiB).
void gemv_avx2(const int8_t* CB, const float* scale, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  constexpr int64_t kRowTile = 16;
  at::parallel_for(0, N, kRowTile, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
      const int64_t t1 = std::min(n1, t0 + kRowTile);
      for_each_row_group<4>(M, [&](auto rows, int64_t m) {
        gemv_avx2_rows<rows>(CB, scale, x + m * K, N, K, out + m * N, t0, t1);
      });
    }
  });
}

// Eight values of a weight row at a time for panel_gemm_avx2, scaled as decode_rows scales them.
struct Int8Decoder {
  const int8_t* CB;
  const float* scale;
  int64_t K;
  LOWBIT_AVX2 __m256 operator()(int64_t n, int64_t k) const {
    return _mm256_mul_ps(int8x8_to_float(CB + n * K + k), _mm256_set1_ps(scale[n]));
  }
  float tail(int64_t n, int64_t k) const { return static_cast<float>(CB[n * K + k]) * scale[n]; }
};
#endif

at::Tensor int8_weight_linear_cpu(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                  const std::optional<at::Tensor>& bias) {
  validate_int8_weight_linear(x, CB, SCB, bias);
  const int64_t N = CB.size(0), K = CB.size(1);
  const int64_t M = row_count(x);
  const at::Tensor x2 = flatten_rows(x).to(at::kFloat).contiguous();
  const at::Tensor w = CB.contiguous();
  const at::Tensor scale = SCB / 127.0f;  // the row scale of Linear8bit.dequantize(), in float32
  at::Tensor out = at::empty({M, N}, x2.options());
  const int8_t* cb = w.const_data_ptr<int8_t>();
  const float* s = scale.const_data_ptr<float>();
  if (M > 0 && N > 0) {
    const float* xp = x2.const_data_ptr<float>();
#if LOWBIT_X86
    // The AMX kernel declines (returns false) when some |x| is outside its exact range: the next path then.
    if (M > kMaxGemvRowsBeforeAmx && use_amx_bf16() &&
        amx::int8_weight_gemm(xp, M, cb, s, N, K, out.data_ptr<float>())) {
    } else
#endif
#if LOWBIT_X86
    if (M > kMaxGemvRows && use_avx512()) {
      panel_gemm(N, K, xp, M, out.data_ptr<float>(),
                 [&](int64_t n0, int64_t rows, float* panel) { decode_int8_panel(cb, s, K, n0, rows, panel); });
    } else if (M > kMaxGemvRows && use_avx2()) {
      panel_gemm_avx2(N, K, xp, M, out.data_ptr<float>(), Int8Decoder{cb, s, K});
    } else
#endif
    if (M > (cpu_isa() == CpuIsa::portable ? kMaxPortableGemvRows : kMaxGemvRows)) {
      gemm_slabs(N, K, x2, out, [&](int64_t n0, int64_t n1, float* dst) { decode_rows(cb, s, K, n0, n1, dst); });
#if LOWBIT_X86
    } else if (use_avx512()) {
      gemv_avx512(cb, s, xp, M, N, K, out.data_ptr<float>());
    } else if (use_avx2()) {
      gemv_avx2(cb, s, xp, M, N, K, out.data_ptr<float>());
#elif LOWBIT_ARM
    } else if (cpu_isa() >= CpuIsa::neon) {
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        neon::int8_weight_gemv(cb, s, xp, M, N, K, out.data_ptr<float>(), n0, n1);
      });
#endif
    } else {
      gemv_portable(cb, s, xp, M, N, K, out.data_ptr<float>());
    }
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type()).view(linear_output_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("int8_weight_linear", &int8_weight_linear_cpu); }

}  // namespace lowbit

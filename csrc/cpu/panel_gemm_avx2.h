// The many-rows path of the CPU linears with a compressed weight on AVX2 CPUs (linear_4bit's 4-bit codes,
// int8_weight_linear's int8 rows): panel_gemm.h's GEMM for AVX2's 16 registers of 8 floats. Each panel of 16
// weight rows is decoded once into the layout the inner loop reads (per k, the 16 rows' values side by side),
// and the rows of x pass over it in tiles of up to 6: 12 accumulators, 2 panel loads and 6 broadcasts per 12
// FMAs. Against decoding float slabs for the BLAS GEMM (gemm_slabs.h), no decoded weight is written to memory
// and read back re-packed, and the decode needs no second pass.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/avx2.h"
#include "cpu/gemm_slabs.h"
#include "cpu/isa.h"
#include "cpu/panel_gemm.h"

#if LOWBIT_X86
namespace lowbit {

constexpr int64_t kAvx2PanelRows = 16, kAvx2MaxTileRows = 6;

// Weight rows [n0, n0 + rows), rows <= 16, into panel[k * 16 + r] (zero from row `rows` on). decoder(n, k, dst)
// writes row n's values k..k+7 (k + 8 <= K, k a multiple of 8); 8 rows' chunks are transposed in registers.
// decoder.tail(n, k) gives one value of the K % 8 tail.
template <typename Decoder>
LOWBIT_AVX2 void decode_panel_avx2(const Decoder& decoder, int64_t K, int64_t n0, int64_t rows, float* panel) {
  const int64_t K8 = K / 8 * 8;
  for (int half = 0; half < 2; ++half) {
    const int64_t first = n0 + 8 * half;
    const int valid = static_cast<int>(std::clamp<int64_t>(rows - 8 * half, 0, 8));
    for (int64_t k = 0; k < K8; k += 8) {
      __m256i v[8];
      for (int r = 0; r < 8; ++r) v[r] = r < valid ? _mm256_castps_si256(decoder(first + r, k)) : _mm256_setzero_si256();
      transpose8x8(v);
      for (int c = 0; c < 8; ++c)
        _mm256_store_ps(panel + (k + c) * kAvx2PanelRows + 8 * half, _mm256_castsi256_ps(v[c]));
    }
    for (int64_t k = K8; k < K; ++k)
      for (int r = 0; r < 8; ++r) panel[k * kAvx2PanelRows + 8 * half + r] = r < valid ? decoder.tail(first + r, k) : 0.f;
  }
}

// out[m, 0:cols] = x[m, :] @ panel for the tile's rows, summed kSumChunk k at a time from fresh accumulators (see
// panel_gemm.h: one running sum over K erred beyond the tests' tolerance).
template <int Rows>
LOWBIT_AVX2 void panel_tile_avx2(const float* x, int64_t K, const float* panel, float* out, int64_t ldo, int cols) {
  // Lanes of the panel's two vectors that hold valid outputs (all bits set), for the masked loads and stores.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i columns0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);
  const __m256i columns1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane);
  for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {
    __m256 acc[Rows][2];
    for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + kSumChunk); ++k) {
      const __m256 w0 = _mm256_load_ps(panel + k * kAvx2PanelRows), w1 = _mm256_load_ps(panel + k * kAvx2PanelRows + 8);
      for (int m = 0; m < Rows; ++m) {
        const __m256 xk = _mm256_broadcast_ss(x + m * K + k);
        acc[m][0] = _mm256_fmadd_ps(xk, w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xk, w1, acc[m][1]);
      }
    }
    for (int m = 0; m < Rows; ++m)
      for (int v = 0; v < 2; ++v) {
        float* dst = out + m * ldo + 8 * v;
        const __m256i columns = v == 0 ? columns0 : columns1;
        if (k0 > 0) acc[m][v] = _mm256_add_ps(acc[m][v], _mm256_maskload_ps(dst, columns));
        _mm256_maskstore_ps(dst, columns, acc[m][v]);
      }
  }
}

template <int Rows = kAvx2MaxTileRows>
LOWBIT_AVX2 void panel_tile_rows_avx2(int rows, const float* x, int64_t K, const float* panel, float* out, int64_t ldo,
                                      int cols) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return panel_tile_rows_avx2<Rows - 1>(rows, x, K, panel, out, ldo, cols);
  }
  panel_tile_avx2<Rows>(x, K, panel, out, ldo, cols);
}

// out = x @ W.T, x: float32 [M, K], out: float32 [M, N], the weight's rows decoded by `decoder` (see
// decode_panel_avx2).
template <typename Decoder>
void panel_gemm_avx2(int64_t N, int64_t K, const float* x, int64_t M, float* out, const Decoder& decoder) {
  parallel_panels(N, M, kAvx2PanelRows, kAvx2MaxTileRows, [&](int64_t n0, int64_t rows, const auto& for_each_tile) {
    float* panel = slab_memory(K * kAvx2PanelRows);
    decode_panel_avx2(decoder, K, n0, rows, panel);
    for_each_tile([&](int64_t m0, int64_t m1) {
      panel_tile_rows_avx2(static_cast<int>(m1 - m0), x + m0 * K, K, panel, out + m0 * N + n0, N, static_cast<int>(rows));
    });
  });
}

}  // namespace lowbit
#endif

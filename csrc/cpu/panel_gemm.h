// The many-rows path of the CPU linears with a compressed weight on AVX-512 CPUs (linear_4bit's 4-bit codes,
// int8_weight_linear's int8 rows where AMX does not run): a GEMM whose weight is decoded straight into the
// layout its inner loop reads. Decoding to a float slab and calling the BLAS GEMM (gemm_slabs.h) writes every
// decoded weight once and has the BLAS read and re-pack it; here each panel of 32 weight rows is decoded once,
// already packed, and every row of x then streams past it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/gemm_slabs.h"
#include "cpu/isa.h"

namespace lowbit {

// How the panel GEMMs (this file's, and int8_gemm_avx2.h's) share work among threads: the weight's N rows are
// cut into panels of panel_rows, x's M rows into tiles of at most tile_rows, split evenly (64 rows in tiles of 12
// as 11, 11, 11, 11, 10, 10, not 5 x 12 + 4). Each thread takes an equal share of the panels; for each it calls
// panel(n0, rows, for_each_tile), which prepares the panel (decodes it into the thread's memory) and calls
// for_each_tile(tile) to run tile(m0, m1) over its tiles. With fewer panels than threads (a narrow weight), the
// tiles are split into groups too, and each group prepares its panel again.
template <typename Panel>
void parallel_panels(int64_t N, int64_t M, int64_t panel_rows, int64_t tile_rows, const Panel& panel) {
  const int64_t panels = (N + panel_rows - 1) / panel_rows;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t tiles = (M + tile_rows - 1) / tile_rows;
  const int64_t groups = std::clamp<int64_t>(threads / panels, 1, tiles);
  const int64_t items = panels * groups;
  at::parallel_for(0, items, (items + threads - 1) / threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / groups, group = i % groups;
      const int64_t n0 = p * panel_rows, rows = std::min(panel_rows, N - n0);
      panel(n0, rows, [&](const auto& tile) {
        for (int64_t t = group * tiles / groups; t < (group + 1) * tiles / groups; ++t) tile(t * M / tiles, (t + 1) * M / tiles);
      });
    }
  });
}

#if LOWBIT_X86

// The inner loop's output tile: up to 12 rows of x by one panel of 32 weight rows (two vectors of 16 outputs).
// Its 24 accumulators, the panel's 2 vectors and a broadcast of x fit the 32 vector registers; per k, 2 panel
// loads and 12 broadcasts feed 24 FMAs, 12 cycles on the two FMA ports and within what the load ports sustain.
// Vectors run along the output's columns, so the tile is stored as it is: no reduction across lanes.
constexpr int64_t kPanelRows = 32, kMaxTileRows = 12;

// 16 bytes of each of 16 weight rows (row r's at rows + r * row_bytes; rows from `valid` on read as zero) as
// four vectors of dwords: vector c, lane r holds row r's bytes 4c..4c+3. Loaded so that 128-bit lane L of vector
// p holds row 4L + p, an in-lane 4 x 4 transpose of dwords brings every row's dword c to lane r of vector c: 16
// loads and 8 shuffles for 256 bytes, against a gather per vector.
LOWBIT_AVX512 inline void byte_columns(const uint8_t* rows, int64_t row_bytes, int valid, __m512i columns[4]) {
  const auto row = [&](int r) {
    return r < valid ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * row_bytes)) : _mm_setzero_si128();
  };
  __m512i by_lane[4];
  for (int p = 0; p < 4; ++p)
    by_lane[p] = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(row(p)), row(4 + p), 1), row(8 + p), 2),
        row(12 + p), 3);
  const __m512i low01 = _mm512_unpacklo_epi32(by_lane[0], by_lane[1]);
  const __m512i high01 = _mm512_unpackhi_epi32(by_lane[0], by_lane[1]);
  const __m512i low23 = _mm512_unpacklo_epi32(by_lane[2], by_lane[3]);
  const __m512i high23 = _mm512_unpackhi_epi32(by_lane[2], by_lane[3]);
  columns[0] = _mm512_unpacklo_epi64(low01, low23);
  columns[1] = _mm512_unpackhi_epi64(low01, low23);
  columns[2] = _mm512_unpacklo_epi64(high01, high23);
  columns[3] = _mm512_unpackhi_epi64(high01, high23);
}

// out[m, 0:32] = x[m, :] @ panel for the tile's rows; `columns` masks the panel's valid outputs. The sum runs
// in chunks of kSumChunk k, each from fresh accumulators added to the output: one running sum over all of K
// rounds every k into an ever larger value, and erred up to 3-7x the tolerance (twice the BLAS GEMM's error)
// at K = 1024-4096. With chunks of 128 the worst of 120 random cases at 16-65 rows and K = 128-4096 was 0.52 of
// it (0.44-0.50 with chunks of 64, which cost about 2% more time: a load, add and store per accumulator per
// chunk); 32 cost 8%. Measured 2026-11-29 on a 2-core Sapphire Rapids VM.
constexpr int64_t kSumChunk = 128;

template <int Rows>
LOWBIT_AVX512 void panel_tile(const float* x, int64_t K, const float* panel, float* out, int64_t ldo,
                              __mmask16 columns0, __mmask16 columns1) {
  for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {
    __m512 acc[Rows][2];
    for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + kSumChunk); ++k) {
      const __m512 w0 = _mm512_load_ps(panel + k * kPanelRows), w1 = _mm512_load_ps(panel + k * kPanelRows + 16);
      for (int m = 0; m < Rows; ++m) {
        const __m512 xk = _mm512_set1_ps(x[m * K + k]);
        acc[m][0] = _mm512_fmadd_ps(xk, w0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(xk, w1, acc[m][1]);
      }
    }
    for (int m = 0; m < Rows; ++m)
      for (int v = 0; v < 2; ++v) {
        float* dst = out + m * ldo + 16 * v;
        const __mmask16 columns = v == 0 ? columns0 : columns1;
        if (k0 > 0) acc[m][v] = _mm512_add_ps(acc[m][v], _mm512_maskz_loadu_ps(columns, dst));
        _mm512_mask_storeu_ps(dst, columns, acc[m][v]);
      }
  }
}

template <int Rows = kMaxTileRows>
LOWBIT_AVX512 void panel_tile_rows(int rows, const float* x, int64_t K, const float* panel, float* out,
                                   int64_t ldo, __mmask16 columns0, __mmask16 columns1) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return panel_tile_rows<Rows - 1>(rows, x, K, panel, out, ldo, columns0, columns1);
  }
  panel_tile<Rows>(x, K, panel, out, ldo, columns0, columns1);
}

// out = x @ W.T, x: float32 [M, K], out: float32 [M, N]; decode(n0, rows, panel) writes weight rows
// [n0, n0 + rows), rows <= 32, as panel[k * 32 + r] = W[n0 + r, k] and zeros from row `rows` on. Each panel is
// decoded once into the thread's L2 (K x 128 bytes) and the rows of x pass over it in tiles of at most 12
// (parallel_panels).
template <typename DecodePanel>
void panel_gemm(int64_t N, int64_t K, const float* x, int64_t M, float* out, const DecodePanel& decode) {
  parallel_panels(N, M, kPanelRows, kMaxTileRows, [&](int64_t n0, int64_t rows, const auto& for_each_tile) {
    float* panel = slab_memory(K * kPanelRows);
    decode(n0, rows, panel);
    // The panel's valid outputs in each of its two vectors.
    const auto mask = [](int64_t n) { return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1); };
    const __mmask16 columns0 = mask(rows), columns1 = mask(rows - 16);
    for_each_tile([&](int64_t m0, int64_t m1) {
      panel_tile_rows(static_cast<int>(m1 - m0), x + m0 * K, K, panel, out + m0 * N + n0, N, columns0, columns1);
    });
  });
}

#endif

}  // namespace lowbit

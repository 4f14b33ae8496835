// int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exact, on AVX2 CPUs: LLM.int8()'s many-rows product.
//
// Why not at::_int_mm: on a CPU without AVX-512 VNNI it takes a slow path (1.5 s for 256 x 4096 x 4096 on an
// AVX2 EPYC, 26x fp32's time). Why vpmaddwd: it multiplies 16 pairs of int16 and adds each pair into an int32
// lane, exact for int8 values (|pair| <= 2 * 128^2), 16 multiply-adds in two instructions with the vpaddd, as
// dense as an fp32 FMA per instruction but on more ports (Intel: p0/p1 for vpmaddwd, p0/p1/p5 for vpaddd; Zen:
// two pipes for each), and on int8 operands: the weight panel is half fp32's bytes. vpmaddubsw (32 products per
// instruction) saturates int16 for unsigned x signed int8 unless one side is 7-bit, which LLM.int8()'s codes
// are not.
//
// Layout: a panel of 16 weight rows holds, per pair of k, each row's two int16 values side by side in one dword
// (panel[kk * 16 + r] = {w[r][2kk], w[r][2kk + 1]}), so one load gives 8 rows' pairs; x is widened to int16 once
// and its pair (x[m][2kk], x[m][2kk + 1]) broadcast as a dword. The tile is 6 rows of x by 16 weight rows:
// 12 int32 accumulators, 2 panel vectors and a broadcast in AVX2's 16 registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/avx2.h"
#include "cpu/gemm_slabs.h"
#include "cpu/isa.h"
#include "cpu/panel_gemm.h"

#if LOWBIT_X86
namespace lowbit {

constexpr int64_t kInt8PanelRows = 16, kInt8TileRows = 6;

// Weight rows [n0, n0 + rows), rows <= 16, as int16 pairs: panel[kk * 16 + r] for kk < pairs = ceil(K / 2), zero
// beyond `rows` and for the odd K's missing partner. 16 bytes of a row widen to 8 pair-dwords, and 8 rows of them
// transpose in registers.
LOWBIT_AVX2 inline void pack_int8_panel(const int8_t* B, int64_t K, int64_t n0, int64_t rows, int32_t* panel) {
  const int64_t K16 = K / 16 * 16, pairs = (K + 1) / 2;
  for (int half = 0; half < 2; ++half) {
    const int64_t first = n0 + 8 * half;
    const int valid = static_cast<int>(std::clamp<int64_t>(rows - 8 * half, 0, 8));
    for (int64_t k0 = 0; k0 < K16; k0 += 16) {
      __m256i v[8];
      for (int r = 0; r < 8; ++r)
        v[r] = r < valid ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (first + r) * K + k0)))
                         : _mm256_setzero_si256();
      transpose8x8(v);
      for (int c = 0; c < 8; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + (k0 / 2 + c) * kInt8PanelRows + 8 * half), v[c]);
    }
    for (int64_t kk = K16 / 2; kk < pairs; ++kk)
      for (int r = 0; r < 8; ++r) {
        const int8_t* row = B + (first + r) * K;
        const int16_t lo = r < valid ? row[2 * kk] : 0, hi = r < valid && 2 * kk + 1 < K ? row[2 * kk + 1] : 0;
        panel[kk * kInt8PanelRows + 8 * half + r] =
            static_cast<int32_t>(static_cast<uint16_t>(lo) | static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
      }
  }
}

// out[m, 0:cols] = x16[m] . panel for the tile's Rows rows; x16 rows are `pairs` dwords long.
template <int Rows>
LOWBIT_AVX2 void int8_tile(const int32_t* x16, int64_t pairs, const int32_t* panel, int32_t* out, int64_t ldo,
                           int64_t cols) {
  __m256i acc[Rows][2];
  for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk * kInt8PanelRows));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk * kInt8PanelRows + 8));
    for (int m = 0; m < Rows; ++m) {
      const __m256i xk = _mm256_set1_epi32(x16[m * pairs + kk]);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(xk, w0));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(xk, w1));
    }
  }
  if (cols == kInt8PanelRows) {
    for (int m = 0; m < Rows; ++m) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo), acc[m][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo + 8), acc[m][1]);
    }
    return;
  }
  alignas(32) int32_t tile[2 * 8];
  for (int m = 0; m < Rows; ++m) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile), acc[m][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + 8), acc[m][1]);
    std::copy(tile, tile + cols, out + m * ldo);
  }
}

template <int Rows = kInt8TileRows>
LOWBIT_AVX2 void int8_tile_rows(int rows, const int32_t* x16, int64_t pairs, const int32_t* panel, int32_t* out,
                                int64_t ldo, int64_t cols) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return int8_tile_rows<Rows - 1>(rows, x16, pairs, panel, out, ldo, cols);
  }
  int8_tile<Rows>(x16, pairs, panel, out, ldo, cols);
}

// A: int8 [M, K], B: int8 [N, K], out: int32 [M, N], all contiguous.
inline void int8_gemm_avx2(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, int32_t* out) {
  const int64_t pairs = (K + 1) / 2;
  // x widened to int16 (a zero after an odd K), read as one dword per pair.
  std::vector<int32_t> x16(M * pairs, 0);
  auto* x16_halves = reinterpret_cast<int16_t*>(x16.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x16_halves[m * 2 * pairs + k] = A[m * K + k];
  parallel_panels(N, M, kInt8PanelRows, kInt8TileRows, [&](int64_t n0, int64_t rows, const auto& for_each_tile) {
    auto* panel = reinterpret_cast<int32_t*>(slab_memory(pairs * kInt8PanelRows));
    pack_int8_panel(B, K, n0, rows, panel);
    for_each_tile([&](int64_t m0, int64_t m1) {
      int8_tile_rows(static_cast<int>(m1 - m0), x16.data() + m0 * pairs, pairs, panel, out + m0 * N + n0, N, rows);
    });
  });
}

}  // namespace lowbit
#endif

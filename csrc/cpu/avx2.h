// Small AVX2 sequences the kernels share: horizontal sums (AVX-512 has _mm512_reduce_add_*; AVX2 has none) and an
// 8 x 8 transpose of dwords.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

#if LOWBIT_X86
namespace lowbit {

LOWBIT_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

LOWBIT_AVX2 inline int32_t horizontal_sum(__m256i v) {
  const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
  return _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 1)));
}

// 8 rows of 8 dwords transposed in registers: row r's dword c goes to lane r of vector c.
LOWBIT_AVX2 inline void transpose8x8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      u[4 * i + j] = _mm256_unpacklo_epi64(t[4 * i + j], t[4 * i + 2 + j]);
      u[4 * i + 2 + j] = _mm256_unpackhi_epi64(t[4 * i + j], t[4 * i + 2 + j]);
    }
  // Rows 0-3 now sit in u[0] (columns 0 | 4 in the two 128-bit halves), u[2] (1 | 5), u[1] (2 | 6), u[3] (3 | 7);
  // rows 4-7 likewise in u[4..7].
  const int order[4] = {0, 2, 1, 3};
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2x128_si256(u[order[c]], u[4 + order[c]], 0x20);
    v[c + 4] = _mm256_permute2x128_si256(u[order[c]], u[4 + order[c]], 0x31);
  }
}

}  // namespace lowbit
#endif

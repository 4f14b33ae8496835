// Horizontal sums of AVX2 vectors (AVX-512 has _mm512_reduce_add_*; AVX2 has no such sequence of its own).
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

}  // namespace lowbit
#endif

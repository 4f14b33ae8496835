// 4-bit codes to float32 on AVX2, shared by linear_4bit and dequantize_4bit.
//
// AVX-512's vpermps indexes 16 floats, so one instruction looks a code up in the whole table. AVX2's indexes 8:
// the table is held as two halves, each code looked up in both, and bit 3 of the code (shifted into the sign
// bit, the only bit blendv reads) picks the half. Two permutes run on one port (port 5 on Intel, FP1/FP2 on
// Zen), so decoding is bounded at about 4 weights per cycle per core: enough to keep up with one core's share
// of memory bandwidth at 0.5 bytes per weight.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/avx2.h"
#include "cpu/isa.h"

#if LOWBIT_X86
namespace lowbit {

// A 16-entry float table (codes 0..15) as two 8-lane halves.
struct Table16 {
  __m256 low, high;
};

LOWBIT_AVX2 inline Table16 load_table16(const float* table) {
  return {_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)};
}

// Every entry times s: the dequantized values of one block, each the same single float product as the reference's.
LOWBIT_AVX2 inline Table16 scaled(const Table16& t, float s) {
  const __m256 scale = _mm256_set1_ps(s);
  return {_mm256_mul_ps(t.low, scale), _mm256_mul_ps(t.high, scale)};
}

// table[code] for 8 lanes of codes in 0..15 (as 32-bit integers).
LOWBIT_AVX2 inline __m256 lookup16(__m256i codes, const Table16& t) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.low, codes), _mm256_permutevar8x32_ps(t.high, codes),
                          _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// The 8 codes of 4 packed bytes, in element order: element 2j is the high nibble of byte j, so lane e shifts
// the little-endian dword right by 8 (e / 2) + 4 (1 - e % 2).
LOWBIT_AVX2 inline __m256i codes8(const uint8_t* bytes) {
  int32_t dword;
  std::memcpy(&dword, bytes, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(dword), shifts), _mm256_set1_epi32(0xF));
}

// dst[0, len) = the len codes starting at bytes[0]'s high nibble, decoded with one block's scaled table; len % 8 == 0.
LOWBIT_AVX2 inline void decode_block_avx2(const uint8_t* bytes, int64_t len, const Table16& block_table, float* dst) {
  for (int64_t i = 0; i < len; i += 8) _mm256_storeu_ps(dst + i, lookup16(codes8(bytes + i / 2), block_table));
}

}  // namespace lowbit
#endif

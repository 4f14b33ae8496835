// NF4/FP4 weights on aarch64 NEON: the few-rows GEMV of linear_4bit and the row decode its many-rows path (and
// dequantize_4bit) hands to the BLAS GEMM.
//
// NEON has no float permute across 16 lanes, but it has a 16-byte table lookup (tbl, vqtbl1q_u8) that looks up 16
// indices per instruction. The 16-entry float table is held as four byte planes (plane p: byte p of every entry);
// four lookups and two rounds of zips (vzip1q/vzip2q, which interleave bytes, then 16-bit halves) rebuild 16
// floats: 12 instructions for 16 weights, with the nibbles split by one shift and one and per 32. A 64-byte
// vqtbl4q_u8 lookup of whole floats would first need 4 byte indices per float built from each code.
//
// Byte j of a block holds elements 2j (high nibble) and 2j + 1 (low nibble), so the high nibbles of 16 bytes decode
// the even elements of 32 and the low nibbles the odd ones. vld2q_f32 loads 8 floats of x split into their even and
// odd lanes, matching the decoded planes without reordering x in memory; vst2q_f32 interleaves them back on decode.
//
// ATen-free (plain pointers and sizes, the caller splits the rows among threads), so tests/arm/ runs these under
// an emulator against the format's own definition (formats.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"
#include "cpu/row_groups.h"
#include "formats.h"

#if LOWBIT_ARM
namespace lowbit::neon {

struct TablePlanes {
  uint8x16_t plane[4];
};

inline TablePlanes table_planes(const float* table) {
  alignas(16) uint8_t bytes[4][16];
  for (int e = 0; e < 16; ++e) {
    uint32_t bits;
    std::memcpy(&bits, table + e, sizeof(bits));
    for (int p = 0; p < 4; ++p) bytes[p][e] = static_cast<uint8_t>(bits >> (8 * p));
  }
  return {{vld1q_u8(bytes[0]), vld1q_u8(bytes[1]), vld1q_u8(bytes[2]), vld1q_u8(bytes[3])}};
}

// table[codes[i]] for the 16 codes (each 0..15) into v[0..3], four floats each, in order. Little-endian: byte p of
// a float is its bits p * 8 .. p * 8 + 7.
inline void lookup16(const TablePlanes& t, uint8x16_t codes, float32x4_t v[4]) {
  const uint8x16_t b0 = vqtbl1q_u8(t.plane[0], codes), b1 = vqtbl1q_u8(t.plane[1], codes);
  const uint8x16_t b2 = vqtbl1q_u8(t.plane[2], codes), b3 = vqtbl1q_u8(t.plane[3], codes);
  const uint16x8_t low01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), high01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t low23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), high23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  v[0] = vreinterpretq_f32_u16(vzip1q_u16(low01, low23));
  v[1] = vreinterpretq_f32_u16(vzip2q_u16(low01, low23));
  v[2] = vreinterpretq_f32_u16(vzip1q_u16(high01, high23));
  v[3] = vreinterpretq_f32_u16(vzip2q_u16(high01, high23));
}

// The 32 weights of 16 packed bytes: even[j] holds elements 8j, 8j + 2, 8j + 4, 8j + 6, odd[j] the ones after them.
inline void decode32(const TablePlanes& t, const uint8_t* bytes, float32x4_t even[4], float32x4_t odd[4]) {
  const uint8x16_t packed = vld1q_u8(bytes);
  lookup16(t, vshrq_n_u8(packed, 4), even);
  lookup16(t, vandq_u8(packed, vdupq_n_u8(0xF)), odd);
}

// Weight rows [n0, n1) as float32 into dst (row n at dst + (n - n0) * K): each value the single product
// table[code] * scale that Weight4::value computes, so bit for bit the portable decode. K % blocksize == 0.
inline void decode_4bit_rows(const Weight4& w, int64_t n0, int64_t n1, float* dst) {
  const TablePlanes t = table_planes(w.table);
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.K / 2;
    float* out = dst + (n - n0) * w.K;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const float s = w.scale(n * blocks_per_row + b);
      for (int64_t k = b * w.blocksize; k < (b + 1) * w.blocksize; k += 32) {
        float32x4_t even[4], odd[4];
        decode32(t, row + k / 2, even, odd);
        for (int j = 0; j < 4; ++j) {
          const float32x4x2_t pair = {{vmulq_n_f32(even[j], s), vmulq_n_f32(odd[j], s)}};
          vst2q_f32(out + k + 8 * j, pair);
        }
      }
    }
  }
}

// out[m * N + n] = sum_k x[m, k] * W[n, k] for MT rows of x (row stride K) and weight rows [n0, n1); K % blocksize
// == 0. Each block's products are summed unscaled and scaled once, as the other levels' GEMVs do. One row of x
// keeps four FMA chains (even and odd planes, alternate 8-element groups) so the FMAs' 4-cycle latency does not
// bound it; with more rows the rows' chains overlap, and 4 rows fill the 32 registers (8 chains, 8 decoded
// vectors, 4 table planes, totals, x).
template <int MT>
void gemv_4bit_rows(const Weight4& w, const float* x, int64_t N, float* out, int64_t n0, int64_t n1) {
  constexpr int kChains = MT <= 2 ? 4 : 2;
  const TablePlanes t = table_planes(w.table);
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.K / 2;
    float32x4_t total[MT];
    for (int m = 0; m < MT; ++m) total[m] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      float32x4_t acc[MT][kChains];
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < kChains; ++c) acc[m][c] = vdupq_n_f32(0.f);
      for (int64_t k = b * w.blocksize; k < (b + 1) * w.blocksize; k += 32) {
        float32x4_t even[4], odd[4];
        decode32(t, row + k / 2, even, odd);
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < 4; ++j) {
            const float32x4x2_t xv = vld2q_f32(x + m * w.K + k + 8 * j);
            const int c = (2 * j) % kChains;
            acc[m][c] = vfmaq_f32(acc[m][c], even[j], xv.val[0]);
            acc[m][c + 1] = vfmaq_f32(acc[m][c + 1], odd[j], xv.val[1]);
          }
      }
      const float s = w.scale(n * blocks_per_row + b);
      for (int m = 0; m < MT; ++m) {
        float32x4_t block = acc[m][0];
        for (int c = 1; c < kChains; ++c) block = vaddq_f32(block, acc[m][c]);
        total[m] = vfmaq_n_f32(total[m], block, s);
      }
    }
    for (int m = 0; m < MT; ++m) out[m * N + n] = vaddvq_f32(total[m]);
  }
}

// All M rows of x, four at a time.
inline void gemv_4bit(const Weight4& w, const float* x, int64_t M, float* out, int64_t n0, int64_t n1) {
  for_each_row_group<4>(M, [&](auto rows, int64_t m) {
    gemv_4bit_rows<rows>(w, x + m * w.K, w.N, out + m * w.N, n0, n1);
  });
}

}  // namespace lowbit::neon
#endif

// out = x @ CB.T for float32 x and an int8 weight, on AMX-BF16 tiles with every product exact: faster than the
// float32 GEMM of the slab path (which can only approach fp32's own time) wherever the CPU has AMX.
//
// Why it is exact: an int8 weight is an exact bfloat16, and a float32 x splits exactly into three bfloat16
// parts, x = x1 + x2 + x3 (each part rounds the rest to 8 significant bits; 3 x 8 covers float32's 24). Each
// product of a part with a weight then has at most 16 significant bits, exact in the float32 the tiles
// accumulate in, so the only rounding is the accumulation's; the two small parts accumulate apart from the
// large one, so that error is a float32 dot product's. Tiles flush bfloat16 subnormals to zero, so the kernel
// runs only when every nonzero |x| is within [2^-96, 2^96], far from subnormals and from float32 overflow; it
// checks while packing x and declines otherwise.
//
// Layout: C^T = CB · x^T. The weight is the A operand: 16 weight rows × 32 k in bfloat16, converted per call
// into 1 KiB tiles. x is the B operand, which AMX wants in pairs along k ("VNNI": tile row kk holds, for 16
// rows m of x, the pair x[m][2kk], x[m][2kk+1]), split and packed once per call.
//
// Measured 2026-11-29 on a 2-core Sapphire Rapids VM, against fp32 F.linear in the same process: one tile
// multiply takes 4.7 ns with its operands in registers, 6.5 ns streaming them from L1 and 14 ns from L2;
// oneDNN's own bfloat16 GEMM (one product, not three) reaches 3.6x fp32 on one thread at 64 rows on 1536 x 576.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

#if LOWBIT_X86
#define LOWBIT_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))

namespace lowbit {

inline bool use_amx_bf16() { return cpu_isa() == CpuIsa::amx; }

namespace amx {

constexpr int64_t kTile = 16;   // rows of a tile; 16 float32 or 32 bfloat16 per 64-byte tile row
constexpr int64_t kStepK = 32;  // k per tile multiply
constexpr int64_t kParts = 3;   // bfloat16 parts of a float32

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline uint16_t bf16_nearest(float f) {  // round to nearest even (finite f)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// bfloat16 bits of finite floats, rounded to nearest even.
LOWBIT_AMX inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

// 16 x 16 32-bit transpose in registers: r[i] holds row i on entry and column i on return (unpacking 32- and
// 64-bit elements within 128-bit lanes, then moving whole lanes: 64 shuffles).
LOWBIT_AMX inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];  // u[4g + c]: rows 4g..4g+3 of the columns c, c + 4, c + 8, c + 12, one per 128-bit lane
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i low01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i low23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    r[c + 4] = _mm512_shuffle_i32x4(low01, low23, 0xDD);
    r[c + 8] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    r[c + 12] = _mm512_shuffle_i32x4(high01, high23, 0xDD);
  }
}

// Whether every lane of v is 0 or of magnitude within [2^-96, 2^96] (see the top of this file); NaN is not.
LOWBIT_AMX inline bool in_exact_range(__m512 v) {
  const __m512 a = _mm512_abs_ps(v);
  const __mmask16 zero = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __mmask16 inside = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-96f), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p96f), _CMP_LE_OQ);
  return static_cast<__mmask16>(zero | inside) == 0xFFFF;
}

// x [M, K] as the B operand, one contiguous run per block of 16 rows of x so a block streams in order:
// packed[((mb * kParts + part) * Kp/2 + kk) * 16 + m % 16] holds the pair (x[m][2kk], x[m][2kk + 1]) of that
// part (mb = m / 16), zero beyond M and K.
//
// Rows [16 mb, 16 mb + 16) of x, 32 k at a time: each row's 32 floats are split into parts, a part's 16
// bfloat16 pairs packed into one vector (row-major, as x is), and a 16 x 16 transpose per part turns the rows
// into tile rows. Contiguous loads and shuffles: gathering down the columns of x instead cost a tenth of the
// whole call at 512 rows. Returns whether every element was within the exact range; the range check rides
// along, because a separate pass over x cost as much as the packing at 512 rows.
LOWBIT_AMX inline bool pack_x_block(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t mb, uint32_t* block) {
  const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
  alignas(64) static constexpr int16_t kLowHalves[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                         22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                         44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i low_halves = _mm512_load_si512(kLowHalves);  // the low 16 bits of every dword of a, then of b
  bool exact = true;
  for (int64_t k0 = 0; k0 < Kp; k0 += kStepK) {
    const auto in_k = [&](int64_t k) {
      return static_cast<__mmask16>(k >= K ? 0 : k + 16 <= K ? 0xFFFF : (1u << (K - k)) - 1);
    };
    const __mmask16 first = in_k(k0), second = in_k(k0 + 16);
    __m512i parts[kParts][kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      const float* row = x + (m0 + r) * K + k0;
      __m512 a = r < rows ? _mm512_maskz_loadu_ps(first, row) : _mm512_setzero_ps();
      __m512 b = r < rows ? _mm512_maskz_loadu_ps(second, row + 16) : _mm512_setzero_ps();
      exact &= in_exact_range(a) & in_exact_range(b);
      for (int64_t p = 0; p < kParts; ++p) {
        const __m512i ea = bf16_bits(a), eb = bf16_bits(b);
        parts[p][r] = _mm512_permutex2var_epi16(ea, low_halves, eb);
        a = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(ea, 16)));
        b = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_slli_epi32(eb, 16)));
      }
    }
    for (int64_t p = 0; p < kParts; ++p) {
      transpose16x16(parts[p]);
      for (int64_t kk = 0; kk < kTile; ++kk)
        _mm512_storeu_si512(block + (p * (Kp / 2) + k0 / 2 + kk) * kTile, parts[p][kk]);
    }
  }
  return exact;
}

// Where element (r, k) of the held weight rows lives: tile after tile (16 rows x 32 k, 1 KiB, contiguous), the
// tiles of a block of 16 rows in k order, so every tile load reads one contiguous KiB.
inline int64_t tiled_offset(int64_t r, int64_t k, int64_t Kp) {
  return ((r / kTile * (Kp / kStepK) + k / kStepK) * kTile + r % kTile) * kStepK + k % kStepK;
}

// Weight rows [n0, n0 + rows) as bfloat16 (exact) in the tiled layout, zero beyond K and from rows to rows_padded.
LOWBIT_AMX inline void weight_rows_bf16(const int8_t* CB, int64_t K, int64_t Kp, int64_t n0, int64_t rows,
                                        int64_t rows_padded, uint16_t* dst) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t r = 0; r < rows_padded; ++r) {
    if (r >= rows) {
      for (int64_t k = 0; k < Kp; k += 16) std::memset(dst + tiled_offset(r, k, Kp), 0, 32);
      continue;
    }
    const int8_t* row = CB + (n0 + r) * K;
    for (int64_t k = 0; k < K16; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      // A small integer is an exact bfloat16: its upper 16 bits.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + tiled_offset(r, k, Kp)),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
    }
    for (int64_t k = K16; k < Kp; ++k)
      dst[tiled_offset(r, k, Kp)] = k < K ? bf16_nearest(static_cast<float>(row[k])) : uint16_t{0};
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes. The configuration belongs to the thread, so each task sets and releases it.
struct TileScope {
  LOWBIT_AMX TileScope() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = kTile;
    }
    // GCC does not count ldtilecfg as a read of the configuration and drops the stores above without this.
    asm volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
  }
  LOWBIT_AMX ~TileScope() { _tile_release(); }
};

// Weight rows [n0, n1) in the tiled layout, padded to whole 32-row groups, in memory kept by the thread.
inline const uint16_t* held_weight(const int8_t* CB, int64_t K, int64_t Kp, int64_t n0, int64_t n1) {
  thread_local std::vector<uint16_t> w;
  const int64_t padded = round_up(n1 - n0, 2 * kTile);
  w.resize(std::max<size_t>(w.size(), padded * Kp));
  weight_rows_bf16(CB, K, Kp, n0, n1 - n0, padded, w.data());
  return w.data();
}

// One block of 16 rows of x (packed: xm) against held weight rows [n0, n1) (w, tiled), written to out scaled.
// Tiles: 0-1 accumulate the first bfloat16 part of x for weight rows 0-15 / 16-31 of a 32-row group, 2-3 the
// two smaller parts (kept apart so their rounding does not add to the large part's: the error stays that of a
// float32 dot product), 4-5 hold the weight rows, 6-7 alternate the parts of x.
LOWBIT_AMX inline void multiply_block(const uint32_t* xm, int64_t m0, int64_t M, const uint16_t* w, int64_t n0,
                                      int64_t n1, const float* scale, int64_t N, int64_t Kp, float* out) {
  alignas(64) float large[2 * kTile][kTile], small[2 * kTile][kTile];
  for (int64_t g = 0; g < n1 - n0; g += 2 * kTile) {
    const uint16_t* wg = w + g * Kp;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < Kp; k0 += kStepK) {
      _tile_loadd(4, wg + tiled_offset(0, k0, Kp), 64);
      _tile_loadd(5, wg + tiled_offset(kTile, k0, Kp), 64);
      const uint32_t* xk = xm + (k0 / 2) * kTile;
      _tile_loadd(6, xk, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(7, xk + (Kp / 2) * kTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(6, xk + 2 * (Kp / 2) * kTile, 64);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
    }
    _tile_stored(0, &large[0][0], sizeof(large[0]));
    _tile_stored(1, &large[kTile][0], sizeof(large[0]));
    _tile_stored(2, &small[0][0], sizeof(small[0]));
    _tile_stored(3, &small[kTile][0], sizeof(small[0]));
    // The tiles hold C^T (weight row, x row): add the parts, transpose each 16 x 16 half and store 16 output
    // columns per row of x, scaled.
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t n = n0 + g + half * kTile, valid = std::min(kTile, n1 - n);
      if (valid <= 0) break;
      __m512i v[kTile];
      for (int64_t r = 0; r < kTile; ++r)
        v[r] = _mm512_castps_si512(
            _mm512_add_ps(_mm512_load_ps(large[half * kTile + r]), _mm512_load_ps(small[half * kTile + r])));
      transpose16x16(v);
      const __mmask16 columns = static_cast<__mmask16>((1u << valid) - 1);
      const __m512 s = _mm512_maskz_loadu_ps(columns, scale + n);
      for (int64_t m = 0; m < std::min(kTile, M - m0); ++m)
        _mm512_mask_storeu_ps(out + (m0 + m) * N + n, columns, _mm512_mul_ps(_mm512_castsi512_ps(v[m]), s));
    }
  }
}

// Weight rows held (as bfloat16, in L2) while blocks of x pass over them: at most 128 (1 MiB at K = 4096, so
// the x data streamed from L3 per weight row is an eighth of what 16-row blocks would stream), and as many
// per task as gives every thread the same number of tasks (192 rows on 2 threads: 96 + 96, not 128 + 64).
constexpr int64_t kMaxHeldRows = 128;

inline int64_t held_rows(int64_t N) {
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = threads * ((N + threads * kMaxHeldRows - 1) / (threads * kMaxHeldRows));
  return round_up((N + tasks - 1) / tasks, 2 * kTile);
}

// Up to this many bytes of bfloat16 weight, each thread holds the whole weight and takes a share of the
// blocks of x, packing each block itself just before using it: one parallel region, and x never crosses
// between cores. Larger weights are split by rows among the threads, x packed once and shared.
constexpr int64_t kMaxWholeWeightBytes = 1 << 20;

// out = (x @ CB.T) * scale per output column, for float32 x [M, K] and int8 CB [N, K]. Returns false when
// some element of x is outside the exact range (out is then incomplete; the caller takes another path).
inline bool int8_weight_gemm(const float* x, int64_t M, const int8_t* CB, const float* scale, int64_t N, int64_t K,
                             float* out) {
  const int64_t Kp = round_up(K, kStepK), Mp = round_up(M, kTile), blocks = Mp / kTile;
  const int64_t block_words = kParts * (Kp / 2) * kTile;
  std::atomic<bool> exact{true};
  if (2 * round_up(N, 2 * kTile) * Kp <= kMaxWholeWeightBytes && blocks >= at::get_num_threads()) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const TileScope tiles;
      const uint16_t* w = held_weight(CB, K, Kp, 0, N);
      thread_local std::vector<uint32_t> xm;
      xm.resize(std::max<size_t>(xm.size(), block_words));
      for (int64_t mb = b0; mb < b1 && exact.load(std::memory_order_relaxed); ++mb) {
        if (!pack_x_block(x, M, K, Kp, mb, xm.data())) exact = false;
        else multiply_block(xm.data(), mb * kTile, M, w, 0, N, scale, N, Kp, out);
      }
    });
    return exact;
  }
  thread_local std::vector<uint32_t> packed;  // every element is written: no clearing
  packed.resize(std::max<size_t>(packed.size(), blocks * block_words));
  uint32_t* xb = packed.data();  // (inside the lambdas, `packed` would name the worker thread's own vector)
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb)
      if (!pack_x_block(x, M, K, Kp, mb, xb + mb * block_words)) exact = false;
  });
  if (!exact) return false;
  const int64_t rows = held_rows(N);
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    const TileScope tiles;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows);
      const uint16_t* w = held_weight(CB, K, Kp, n0, n1);
      for (int64_t mb = 0; mb < blocks; ++mb)
        multiply_block(xb + mb * block_words, mb * kTile, M, w, n0, n1, scale, N, Kp, out);
    }
  });
  return true;
}

}  // namespace amx
}  // namespace lowbit
#endif

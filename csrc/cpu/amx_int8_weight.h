// out = x @ CB.T for float32 x and an int8 weight, on AMX-BF16 tiles with every product exact: faster than the
// float32 GEMM of the slab path (which can only approach fp32's own time) wherever the CPU has AMX.
//
// Why it is exact: an int8 weight is an exact bfloat16, and a float32 x splits exactly into three bfloat16
// parts, x = x1 + x2 + x3 (each part rounds the rest to 8 significant bits; 3 x 8 covers float32's 24). Each
// product of a part with a weight then has at most 16 significant bits, exact in the float32 the tiles
// accumulate in, so the only rounding is the accumulation's; the two small parts accumulate apart from the
// large one, so that error is a float32 dot product's. Tiles flush bfloat16 subnormals to zero, so callers
// use this only when every nonzero |x| is within [2^-96, 2^96] (amx_exact_range), far from subnormals and
// from float32 overflow.
//
// Layout: C^T = CB · x^T. The weight is the A operand: 16 weight rows × 32 k in bfloat16, row-major as CB
// is, so converting a block of rows needs no transpose. x is the B operand, which AMX wants in pairs along k
// ("VNNI": tile row kk holds, for 16 rows m of x, the pair x[m][2kk], x[m][2kk+1]); x is small at prefill,
// so it is split and packed once per call.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

#if LOWBIT_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LOWBIT_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))

namespace lowbit {

// Whether AMX-BF16 may run: the CPU has it, Linux granted this process the tile state (a process must ask
// once, arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), and LOWBIT_CPU_ISA is not "portable" or
// "avx512" (which tests use to reach the other paths).
inline bool use_amx_bf16() {
  static const bool granted = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return (d & kAmxBf16) && (d & kAmxTile) && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  const char* forced = std::getenv("LOWBIT_CPU_ISA");
  return granted && use_avx512() && !(forced && std::strcmp(forced, "avx512") == 0);
}

// Every element of x finite and 0 or of magnitude in [2^-96, 2^96] (see the top of this file).
LOWBIT_AMX inline bool amx_exact_range(const float* x, int64_t n) {
  const float lo = std::ldexp(1.0f, -96), hi = std::ldexp(1.0f, 96);
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const int64_t n16 = n / 16 * 16;
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n16; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    const __mmask16 zero = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __mmask16 inside = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);
    bad |= static_cast<__mmask16>(~(zero | inside));  // NaN compares false: bad
  }
  bool ok = bad == 0;
  for (int64_t i = n16; i < n; ++i) {
    const float a = std::abs(x[i]);
    ok &= (a == 0.f) | ((a >= lo) & (a <= hi));
  }
  return ok;
}

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

// x [M, K] as the B operand, one contiguous run per block of 16 rows of x so a block streams in order:
// packed[((mb * kParts + part) * Kp/2 + kk) * 16 + m % 16] holds the pair (x[m][2kk], x[m][2kk + 1]) of that
// part (mb = m / 16), zero beyond M and K.

// bfloat16 bits of finite floats, rounded to nearest even.
LOWBIT_AMX inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

// Rows [16 mb, 16 mb + 16) of x: per pair of k, one gather of the even and one of the odd elements of the 16 rows,
// split into parts 16 lanes at a time, each part's 16 pairs written as one contiguous 64-byte row.
LOWBIT_AMX inline void pack_x_block(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t mb, uint32_t* block) {
  const int64_t m0 = mb * kTile;
  const __mmask16 rows = static_cast<__mmask16>((1u << std::min<int64_t>(kTile, M - m0)) - 1);
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(static_cast<int32_t>(K)));
  const float* base = x + m0 * K;
  for (int64_t kk = 0; kk < Kp / 2; ++kk) {
    const __m512i at = _mm512_add_epi32(row_offsets, _mm512_set1_epi32(static_cast<int32_t>(2 * kk)));
    __m512 even = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 2 * kk < K ? rows : 0, at, base, 4);
    __m512 odd = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 2 * kk + 1 < K ? rows : 0,
                                          _mm512_add_epi32(at, _mm512_set1_epi32(1)), base, 4);
    for (int64_t p = 0; p < kParts; ++p) {
      const __m512i e = bf16_bits(even), o = bf16_bits(odd);
      even = _mm512_sub_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(e, 16)));
      odd = _mm512_sub_ps(odd, _mm512_castsi512_ps(_mm512_slli_epi32(o, 16)));
      _mm512_storeu_si512(block + (p * (Kp / 2) + kk) * kTile, _mm512_or_si512(e, _mm512_slli_epi32(o, 16)));
    }
  }
}

inline std::vector<uint32_t> pack_x(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp) {
  std::vector<uint32_t> packed(kParts * (Kp / 2) * Mp);
  at::parallel_for(0, Mp / kTile, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb) pack_x_block(x, M, K, Kp, mb, packed.data() + mb * kParts * (Kp / 2) * kTile);
  });
  return packed;
}

// Weight rows [n0, n0 + rows) as bfloat16 [rows, Kp] (exact), zero beyond K.
LOWBIT_AMX inline void weight_rows_bf16(const int8_t* CB, int64_t K, int64_t Kp, int64_t n0, int64_t rows,
                                        uint16_t* dst) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = CB + (n0 + r) * K;
    uint16_t* out = dst + r * Kp;
    for (int64_t k = 0; k < K16; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      // A small integer is an exact bfloat16: its upper 16 bits.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
    }
    for (int64_t k = K16; k < K; ++k) out[k] = bf16_nearest(static_cast<float>(row[k]));
    std::fill(out + K, out + Kp, uint16_t{0});
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Weight rows held (as bfloat16, in L2) while every block of x passes over them: at most 128 (1 MiB at K = 4096,
// so the x data streamed from L3 per weight row is an eighth of what 16-row blocks would stream), and as many
// per task as gives every thread the same number of tasks (192 rows on 2 threads: 96 + 96, not 128 + 64).
constexpr int64_t kMaxHeldRows = 128;

inline int64_t held_rows(int64_t N) {
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = threads * ((N + threads * kMaxHeldRows - 1) / (threads * kMaxHeldRows));
  return round_up((N + tasks - 1) / tasks, 2 * kTile);
}

// Weight rows [n0, n1) (at most kMaxHeldRows) against every row of x. Tiles: 0-1 accumulate the first
// bfloat16 part of x for weight rows 0-15 / 16-31 of a 32-row group, 2-3 the two smaller parts (kept apart so
// their rounding does not add to the large part's: the error stays that of a float32 dot product), 4-5 hold
// the weight rows, 6-7 alternate the parts of x. The tile configuration belongs to the thread, so each task
// sets and releases it.
LOWBIT_AMX inline void gemm_held_rows(const uint32_t* xb, int64_t M, int64_t Mp, const int8_t* CB, const float* scale,
                                      int64_t N, int64_t K, int64_t Kp, float* out, int64_t n0, int64_t n1) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTile;
  }
  _tile_loadconfig(&config);
  const int64_t held = n1 - n0, held_padded = round_up(held, 2 * kTile);
  thread_local std::vector<uint16_t> w;
  w.resize(std::max<size_t>(w.size(), held_padded * Kp));
  weight_rows_bf16(CB, K, Kp, n0, held, w.data());  // rows [0, held), each zero-padded to Kp
  std::fill(w.begin() + held * Kp, w.begin() + held_padded * Kp, uint16_t{0});
  alignas(64) float large[2 * kTile][kTile], small[2 * kTile][kTile];
  for (int64_t m0 = 0; m0 < Mp; m0 += kTile) {
    const uint32_t* xm = xb + (m0 / kTile) * kParts * (Kp / 2) * kTile;
    for (int64_t g = 0; g < held_padded; g += 2 * kTile) {
      const uint16_t* wg = w.data() + g * Kp;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < Kp; k0 += kStepK) {
        _tile_loadd(4, wg + k0, Kp * 2);
        _tile_loadd(5, wg + kTile * Kp + k0, Kp * 2);
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
      const int64_t rows = std::min(2 * kTile, held - g);
      for (int64_t m = m0; m < std::min(M, m0 + kTile); ++m)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + g + r;
          out[m * N + n] = (large[r][m - m0] + small[r][m - m0]) * scale[n];
        }
    }
  }
  _tile_release();
}

// out = (x @ CB.T) * scale per output column, for x float32 [M, K] within amx_exact_range, CB int8 [N, K].
inline void int8_weight_gemm(const float* x, int64_t M, const int8_t* CB, const float* scale, int64_t N, int64_t K,
                             float* out) {
  const int64_t Kp = round_up(K, kStepK), Mp = round_up(M, kTile);
  const std::vector<uint32_t> xb = pack_x(x, M, K, Mp, Kp);
  const int64_t rows = held_rows(N);
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      gemm_held_rows(xb.data(), M, Mp, CB, scale, N, K, Kp, out, b * rows, std::min(N, (b + 1) * rows));
  });
}

}  // namespace amx
}  // namespace lowbit
#endif

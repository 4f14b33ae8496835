// int8 weights on aarch64 NEON: the weight-only GEMV of int8_weight_linear (float x) and the exact int8 x int8 ->
// int32 product of LLM.int8() (int8_linear, int8_mm), with and without the dot product instructions.
//
// int8 x int8: with FEAT_DotProd, sdot (vdotq_s32) multiplies 16 byte pairs and adds them in fours into 4 int32
// lanes, one instruction per 16 products. Without it, smull/smull2 (vmull_s8) multiply 8 pairs into int16 (exact:
// |-128 * -128| = 2^14) and sadalp (vpadalq_s16) adds them pairwise into int32: four instructions per 16. Either
// way the sums are exact in int32 for any K below 2^17. The product is tiled 4 rows of a by 4 weight rows: 16
// accumulators, and each 16-byte load feeds 4 multiplies. Rows of a are taken in chunks that stay in L2 while every
// weight tile of the thread's share passes over them.
//
// ATen-free (plain pointers and sizes, the caller splits the weight rows among threads), so tests/arm/ runs these
// under an emulator against plain loops.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/row_groups.h"

#if LOWBIT_ARM
namespace lowbit::neon {

// 16 int8 weights as four float32x4 (sign-extended twice, then converted: exact).
inline void int8x16_to_float(const int8_t* p, float32x4_t v[4]) {
  const int8x16_t bytes = vld1q_s8(p);
  const int16x8_t low = vmovl_s8(vget_low_s8(bytes)), high = vmovl_high_s8(bytes);
  v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(low)));
  v[1] = vcvtq_f32_s32(vmovl_high_s16(low));
  v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(high)));
  v[3] = vcvtq_f32_s32(vmovl_high_s16(high));
}

// out[m * N + n] = scale[n] * sum_k CB[n, k] * x[m, k] for MT rows of x (row stride K) and weight rows [n0, n1).
// As in the 4-bit GEMV, one or two rows keep four FMA chains each so the FMA latency does not bound them.
template <int MT>
void int8_weight_gemv_rows(const int8_t* CB, const float* scale, const float* x, int64_t N, int64_t K, float* out,
                           int64_t n0, int64_t n1) {
  constexpr int kChains = MT <= 2 ? 4 : 2;
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = CB + n * K;
    float32x4_t acc[MT][kChains];
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < K16; k += 16) {
      float32x4_t wv[4];
      int8x16_to_float(row + k, wv);
      for (int m = 0; m < MT; ++m)
        for (int j = 0; j < 4; ++j)
          acc[m][j % kChains] = vfmaq_f32(acc[m][j % kChains], wv[j], vld1q_f32(x + m * K + k + 4 * j));
    }
    for (int m = 0; m < MT; ++m) {
      float32x4_t sum = acc[m][0];
      for (int c = 1; c < kChains; ++c) sum = vaddq_f32(sum, acc[m][c]);
      float total = vaddvq_f32(sum);
      for (int64_t k = K16; k < K; ++k) total += static_cast<float>(row[k]) * x[m * K + k];
      out[m * N + n] = total * scale[n];
    }
  }
}

// All M rows of x, four at a time.
inline void int8_weight_gemv(const int8_t* CB, const float* scale, const float* x, int64_t M, int64_t N, int64_t K,
                             float* out, int64_t n0, int64_t n1) {
  for_each_row_group<4>(M, [&](auto rows, int64_t m) {
    int8_weight_gemv_rows<rows>(CB, scale, x + m * K, N, K, out + m * N, n0, n1);
  });
}

// acc += the 16 byte products of a and b, in fours: the two instruction sets' step of the int8 product.
struct SdotStep {
  LOWBIT_DOTPROD static inline int32x4_t step(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
};
struct WideningStep {
  static inline int32x4_t step(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
  }
};

// MT rows of a against NT weight rows: out[i * N + j] = sum_k a[i, k] * b[j, k].
template <class Dot, int MT, int NT>
[[gnu::always_inline]] inline void int8_tile(const int8_t* a, const int8_t* b, int64_t N, int64_t K, int32_t* out) {
  const int64_t K16 = K / 16 * 16;
  int32x4_t acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = vdupq_n_s32(0);
  for (int64_t k = 0; k < K16; k += 16) {
    int8x16_t av[MT], bv[NT];
    for (int i = 0; i < MT; ++i) av[i] = vld1q_s8(a + i * K + k);
    for (int j = 0; j < NT; ++j) bv[j] = vld1q_s8(b + j * K + k);
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = Dot::step(acc[i][j], av[i], bv[j]);
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      int32_t total = vaddvq_s32(acc[i][j]);
      for (int64_t k = K16; k < K; ++k) total += int32_t(a[i * K + k]) * int32_t(b[j * K + k]);
      out[i * N + j] = total;
    }
}

// Rows [m0, m1) of a against NT weight rows from n.
template <class Dot, int NT>
[[gnu::always_inline]] inline void int8_row_tiles(const int8_t* a, const int8_t* b, int64_t m0, int64_t m1, int64_t N,
                                                  int64_t K, int32_t* out, int64_t n) {
  for (int64_t m = m0; m < m1; m += 4) {
    const int8_t* am = a + m * K;
    int32_t* om = out + m * N + n;
    switch (std::min<int64_t>(4, m1 - m)) {
      case 1: int8_tile<Dot, 1, NT>(am, b + n * K, N, K, om); break;
      case 2: int8_tile<Dot, 2, NT>(am, b + n * K, N, K, om); break;
      case 3: int8_tile<Dot, 3, NT>(am, b + n * K, N, K, om); break;
      default: int8_tile<Dot, 4, NT>(am, b + n * K, N, K, om); break;
    }
  }
}

// out[m * N + n] = sum_k a[m, k] * b[n, k] for every row of a (int8 [M, K]) and weight rows [n0, n1) of b.
template <class Dot>
[[gnu::always_inline]] inline void int8_gemm_with(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                                                  int32_t* out, int64_t n0, int64_t n1) {
  // Rows of a per pass: 256 KiB of them, half a typical Arm core's L2 (1-2 MiB on Neoverse and Apple cores).
  const int64_t rows_per_pass = std::max<int64_t>(4, (int64_t{256} << 10) / std::max<int64_t>(K, 1) / 4 * 4);
  for (int64_t m0 = 0; m0 < M; m0 += rows_per_pass) {
    const int64_t m1 = std::min(M, m0 + rows_per_pass);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) int8_row_tiles<Dot, 4>(a, b, m0, m1, N, K, out, n);
    for (; n < n1; ++n) int8_row_tiles<Dot, 1>(a, b, m0, m1, N, K, out, n);
  }
}

inline void int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* out, int64_t n0,
                      int64_t n1) {
  int8_gemm_with<WideningStep>(a, b, M, N, K, out, n0, n1);
}

LOWBIT_DOTPROD inline void int8_gemm_dotprod(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                                             int32_t* out, int64_t n0, int64_t n1) {
  int8_gemm_with<SdotStep>(a, b, M, N, K, out, n0, n1);
}

}  // namespace lowbit::neon
#endif

// y = x @ dequant(W).T + bias for a 4-bit weight on the CPU, never materializing dequant(W).
//
// Two regimes, because their bottlenecks differ:
//  * few rows of x (decode): the weight is read once and each byte is used for only M
//    multiply-adds, so the kernel is bound by memory and by the cost of decoding codes. The
//    AVX-512 path decodes 16 codes with one vpermps against the 16-entry table held in a
//    register, and feeds the floats straight into FMAs; nothing is written back.
//  * many rows (prefill): the work is a real GEMM. The AVX-512 and AVX2 paths decode panels of 32 or 16
//    weight rows into their own GEMM's packed layout (cpu/panel_gemm.h, cpu/panel_gemm_avx2.h); the portable path
//    dequantizes a bounded slab of weight rows and hands it to the BLAS GEMM. Either way the
//    decoding is amortized over all M rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/dot.h"
#include "cpu/gemm_slabs.h"
#include "cpu/isa.h"
#include "cpu/nibbles_avx2.h"
#include "cpu/nibbles_neon.h"
#include "cpu/panel_gemm.h"
#include "cpu/panel_gemm_avx2.h"
#include "cpu/row_groups.h"
#include "formats.h"
#include "rows.h"
#include "validate.h"
#include "weight4.h"

namespace lowbit {
namespace {

// Rows of x per pass of the GEMV over a weight row: each pass decodes the row again, in registers. 8 rows keep 24
// accumulators (a sum and two nibble planes per row); against 4, measured 2026-11-29 (in-cache A/B, 2-core
// Sapphire Rapids VM): 5-15 rows 5-25% faster (576 x 1536 at 5 rows 77 against 100 us, 1536 x 576 at 8 rows 127
// against 142 us), no shape slower beyond noise.
constexpr int64_t kGemvRows = 8;
// Up to this many rows of x the GEMV (which decodes every weight once per 8 rows of x, in registers) takes the
// call, beyond them the panel GEMM (which decodes it once into memory). The panel GEMM is the faster from 8 rows
// on, but below 16 rows the reference's BLAS switches to a kernel that sums more accurately than the panel GEMM's
// chunked running sums (up to 1.7x the tolerance at 9 rows, K = 256); the GEMV's lanes run along K and keep
// within it. Measured 2026-11-29 on a 2-core Sapphire Rapids VM, in-cache A/B in one process, GEMV / panel GEMM:
// at 4 rows 576 x 576 29 / 36 us, 4096 x 4096 1.20 / 1.61 ms; at 8 rows 1536 x 576 127 / 108 us; at 16 rows (GEMV
// in passes of 4 rows) 576 x 576 109 / 80 us, 1536 x 576 232 / 162 us, 4096 x 4096 4.75 / 3.02 ms. The portable
// path switches to the slab GEMM beyond 8 rows.
constexpr int64_t kMaxFusedRows = 15;
constexpr int64_t kMaxPortableGemvRows = 8;
// The NEON GEMV (4 rows of x per pass) takes the same rows as the portable one; beyond them the slab GEMM, with
// rows decoded by NEON. Not measured: no Arm machine has run it yet (tests/arm/ checks it under an emulator).
constexpr int64_t kMaxNeonGemvRows = kMaxPortableGemvRows;
// The AVX2 GEMV takes 4 rows of x per pass (AVX2 has 16 vector registers: 4 rows' block sums and totals, the byte
// planes and the decoded weights fill them) and hands over to the AVX2 panel GEMM beyond kMaxAvx2GemvRows (not
// below 16 rows, for kMaxFusedRows' accuracy reason). Measured 2026-12-05 (Sapphire Rapids VM forced to AVX2, MKL
// too; ratio to fp32): 4096 x 4096 at 16 rows GEMV 1.11x / panel 0.91x, at 24-31 rows GEMV 0.85-0.93x, panel at
// 32 rows 0.94x; 576 x 1536 at 16 rows 0.99x / 0.96x.
constexpr int64_t kAvx2GemvRows = 4, kMaxAvx2GemvRows = 16;
// Weight rows kept hot while all of x passes over them (16 rows of K=4096 are 32 KiB packed).
constexpr int64_t kRowTile = 16;
// How far ahead of the FMAs the GEMV asks for packed weight bytes: left to the hardware prefetcher, one thread
// streamed ~6 GB/s, latency-bound. Measured 2026-11-29 (2-core Sapphire Rapids VM, M = 1, 4096 x 4096 /
// 14336 x 4096): none 1.33-1.40 / 4.43-4.68 ms, 1 KiB 0.79 / 2.39, 2 KiB 0.76-0.79 / 2.24-2.30 (but M = 16
// twice 40% slower than without), 4 KiB 0.70-0.74 / 2.21-2.27 (M = 16 unchanged).
constexpr int64_t kPrefetchBytes = 4096;

// Row n of the weight into dst[0, K). Works for any K: a row may start mid-byte and blocks may span rows. Where
// rows hold whole blocks (K a multiple of the blocksize, the common case), each block first scales the 16 table
// entries (the same rounded products as Weight4::value) and then every byte is two look-ups: the scalar decode per
// weight (code extraction, product) took ~1.1 ns a weight on one thread, 9.5 ms for 4096 x 4096 on two (2026-12-05).
void dequantize_row(const Weight4& w, int64_t n, float* dst) {
  const int64_t base = n * w.K;
  if (w.K % w.blocksize == 0) {
    const uint8_t* bytes = w.packed + base / 2;
    const int64_t block_bytes = w.blocksize / 2;
    for (int64_t b = 0; b < w.K / w.blocksize; ++b) {
      const float s = w.scale(base / w.blocksize + b);
      float scaled[16];
      for (int c = 0; c < 16; ++c) scaled[c] = mul_rn(w.table[c], s);
      for (int64_t j = b * block_bytes; j < (b + 1) * block_bytes; ++j) {
        dst[2 * j] = scaled[bytes[j] >> 4];
        dst[2 * j + 1] = scaled[bytes[j] & 0xF];
      }
    }
    return;
  }
  int64_t k = 0;
  while (k < w.K) {
    const int64_t block = (base + k) / w.blocksize;
    const int64_t end = std::min(w.K, (block + 1) * w.blocksize - base);
    const float s = w.scale(block);
    for (; k < end; ++k) dst[k] = w.value(base + k, s);
  }
}

// Portable few-rows path: dequantize one weight row into a small buffer, then dot it with each x row.
void gemv_portable(const Weight4& w, const float* x, int64_t M, float* out) {
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(w.K);
    for (int64_t n = n0; n < n1; ++n) {
      dequantize_row(w, n, row.data());
      for (int64_t m = 0; m < M; ++m) out[m * w.N + n] = dot(row.data(), x + m * w.K, w.K);
    }
  });
}

#if LOWBIT_X86
// Byte j of a 16-byte group holds elements 2j (high nibble) and 2j+1 (low nibble). Rather than
// interleave decoded weights, x is reordered once per call so that each 32-element chunk holds
// its 16 even elements and then its 16 odd ones; each nibble plane then meets its x directly.
void deinterleave_x(const float* x, int64_t M, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 32)
      for (int j = 0; j < 16; ++j) {
        xp[m * K + c + j] = x[m * K + c + 2 * j];
        xp[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
      }
}

// MT rows of x at a time (a template so the accumulators stay in registers). Needs K to be a
// multiple of blocksize, so every row starts on a byte and a block never spans two rows.
template <int MT>
LOWBIT_AVX512 void gemv_avx512_rows(const Weight4& w, const float* xp, float* out, int64_t n0, int64_t n1) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.K / 2;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * w.blocksize / 2) + kPrefetchBytes, _MM_HINT_T0);
      // Separate accumulators for the even and odd planes halve the FMA dependency chain.
      __m512 even[MT], odd[MT];
      for (int m = 0; m < MT; ++m) even[m] = odd[m] = _mm512_setzero_ps();
      for (int64_t k = b * w.blocksize; k < (b + 1) * w.blocksize; k += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        const __m512 w_odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table);
        for (int m = 0; m < MT; ++m) {
          even[m] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xp + m * w.K + k), even[m]);
          odd[m] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xp + m * w.K + k + 16), odd[m]);
        }
      }
      const __m512 s = _mm512_set1_ps(w.scale(n * blocks_per_row + b));
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), s, acc[m]);
    }
    for (int m = 0; m < MT; ++m) out[m * w.N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// Weight rows [n0, n0 + rows), rows <= 32, decoded for panel_gemm: panel[k * 32 + r] = W[n0 + r, k], zero from
// row `rows` on. Needs K to be a multiple of the blocksize (and so of 32). In a dword of codes, element 2j sits
// in the high nibble of byte j and 2j + 1 in the low one, so element e is the dword shifted right by
// 8 (e / 2) + 4 (1 - e % 2); vpermps reads only the low 4 bits of each index, so no mask is needed. Each
// value is the table entry times its row's block scale, the same float product as every other decode.
LOWBIT_AVX512 void decode_4bit_panel(const Weight4& w, int64_t n0, int64_t rows, float* panel) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const int64_t row_bytes = w.K / 2, blocks_per_row = w.K / w.blocksize;
  for (int half = 0; half < 2; ++half) {
    const int64_t first = n0 + 16 * half;
    const int valid = static_cast<int>(std::clamp<int64_t>(rows - 16 * half, 0, 16));
    __m512 scale = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < w.K; k0 += 32) {
      if (k0 % w.blocksize == 0) {
        alignas(64) float scales[16] = {};
        for (int r = 0; r < valid; ++r) scales[r] = w.scale((first + r) * blocks_per_row + k0 / w.blocksize);
        scale = _mm512_load_ps(scales);
      }
      __m512i columns[4];
      byte_columns(w.packed + first * row_bytes + k0 / 2, row_bytes, valid, columns);
      float* dst = panel + k0 * kPanelRows + 16 * half;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c)
#pragma GCC unroll 8
        for (int e = 0; e < 8; ++e) {
          const __m512i index = _mm512_srli_epi32(columns[c], 8 * (e / 2) + 4 * (1 - e % 2));
          _mm512_store_ps(dst + (8 * c + e) * kPanelRows, _mm512_mul_ps(_mm512_permutexvar_ps(index, table), scale));
        }
    }
  }
}

void gemv_avx512(const Weight4& w, const float* x, int64_t M, float* out) {
  std::vector<float> xp(M * w.K);
  deinterleave_x(x, M, w.K, xp.data());
  at::parallel_for(0, w.N, kRowTile, [&](int64_t n0, int64_t n1) {
    // Every group of 8 x rows passes over a small tile of weight rows before the next tile is
    // touched, so with M > 8 the packed bytes are re-read from L1/L2, not from memory.
    for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
      const int64_t t1 = std::min(n1, t0 + kRowTile);
      for_each_row_group<kGemvRows>(M, [&](auto rows, int64_t m) {
        gemv_avx512_rows<rows>(w, xp.data() + m * w.K, out + m * w.N, t0, t1);
      });
    }
  });
}

// AVX2 GEMV. AVX2's vpermps indexes only 8 floats, so a 16-entry lookup there is two permutes and a blend per
// 8 weights, all but the blend on the one shuffle port of older cores: about 2 weights per cycle, measured 2026-12-05
// (1.4 ms for 4096 x 4096 at M = 1 on 2 cores, decode-bound at a fifth of the memory's bandwidth). vpshufb instead
// looks up 32 bytes at once in a 16-byte table: with the table's float32 values cut into 4 byte planes, 4 vpshufb
// look up 32 codes, and 8 in-lane unpacks (which newer cores run on two ports) reassemble the bytes into 32 floats,
// in an order of their own that x is permuted to once per call (permute_x_for_planes). Values are the table's
// unscaled; a block's products are summed apart and scaled once, as the AVX-512 GEMV does.
struct BytePlanes {
  __m256i plane[4];  // plane[j]: byte j of each of the 16 table entries, in both 128-bit halves
};

LOWBIT_AVX2 BytePlanes byte_planes(const float* table) {
  alignas(16) uint8_t bytes[4][16];
  for (int c = 0; c < 16; ++c) {
    uint32_t bits;
    std::memcpy(&bits, table + c, 4);
    for (int j = 0; j < 4; ++j) bytes[j][c] = static_cast<uint8_t>(bits >> (8 * j));
  }
  BytePlanes t;
  for (int j = 0; j < 4; ++j) t.plane[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[j])));
  return t;
}

// The 32 codes of 16 packed bytes as 4 vectors of table values. The high nibbles (even elements) go to the low
// 128-bit half, the low nibbles (odd elements) to the high half; byte unpacks then 16-bit unpacks leave in v[i],
// half h, position p the value of element 8i + 2p + h.
LOWBIT_AVX2 inline void decode32(const uint8_t* bytes, const BytePlanes& t, __m256 v[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256i codes = _mm256_set_m128i(_mm_and_si128(packed, nibble), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
  __m256i b[4];
  for (int j = 0; j < 4; ++j) b[j] = _mm256_shuffle_epi8(t.plane[j], codes);
  const __m256i low01 = _mm256_unpacklo_epi8(b[0], b[1]), high01 = _mm256_unpackhi_epi8(b[0], b[1]);
  const __m256i low23 = _mm256_unpacklo_epi8(b[2], b[3]), high23 = _mm256_unpackhi_epi8(b[2], b[3]);
  v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23));
  v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23));
  v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23));
  v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23));
}

// x's rows in decode32's order: within each 32-element chunk, xp[8i + 4h + p] = x[8i + 2p + h].
void permute_x_for_planes(const float* x, int64_t M, int64_t K, float* xp) {
  for (int64_t r = 0; r < M * K; r += 32)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        for (int p = 0; p < 4; ++p) xp[r + 8 * i + 4 * h + p] = x[r + 8 * i + 2 * p + h];
}

// MT rows of x at a time; U chains of FMAs per row (an FMA's 4-cycle latency would bound a single chain to 8
// weights per 4 cycles).
template <int MT>
LOWBIT_AVX2 void gemv_avx2_rows(const Weight4& w, const float* xp, float* out, int64_t n0, int64_t n1) {
  constexpr int U = 4 / MT > 0 ? 4 / MT : 1;
  const BytePlanes planes = byte_planes(w.table);
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.K / 2;
    __m256 total[MT];
    for (int m = 0; m < MT; ++m) total[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * w.blocksize / 2) + kPrefetchBytes, _MM_HINT_T0);
      __m256 sum[MT][U];
      for (int m = 0; m < MT; ++m)
        for (int u = 0; u < U; ++u) sum[m][u] = _mm256_setzero_ps();
      for (int64_t k = b * w.blocksize; k < (b + 1) * w.blocksize; k += 32) {
        __m256 v[4];
        decode32(row + k / 2, planes, v);
        for (int i = 0; i < 4; ++i)
          for (int m = 0; m < MT; ++m)
            sum[m][i % U] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xp + m * w.K + k + 8 * i), sum[m][i % U]);
      }
      const __m256 s = _mm256_set1_ps(w.scale(n * blocks_per_row + b));
      for (int m = 0; m < MT; ++m) {
        for (int u = 1; u < U; ++u) sum[m][0] = _mm256_add_ps(sum[m][0], sum[m][u]);
        total[m] = _mm256_fmadd_ps(sum[m][0], s, total[m]);
      }
    }
    for (int m = 0; m < MT; ++m) out[m * w.N + n] = horizontal_sum(total[m]);
  }
}

void gemv_avx2(const Weight4& w, const float* x, int64_t M, float* out) {
  std::vector<float> xp(M * w.K);
  permute_x_for_planes(x, M, w.K, xp.data());
  at::parallel_for(0, w.N, kRowTile, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
      const int64_t t1 = std::min(n1, t0 + kRowTile);
      for_each_row_group<kAvx2GemvRows>(M, [&](auto rows, int64_t m) {
        gemv_avx2_rows<rows>(w, xp.data() + m * w.K, out + m * w.N, t0, t1);
      });
    }
  });
}

// Eight values of a weight row at a time for panel_gemm_avx2 (K a multiple of the blocksize, so of 32: no tail).
// Each value is table entry times block scale, the reference's one product; the block index is a shift (the
// blocksize is a power of two), since a 64-bit division per 8 values cost more than their decode.
struct Weight4Decoder {
  const Weight4& w;
  Table16 table;
  int block_shift;
  LOWBIT_AVX2 __m256 operator()(int64_t n, int64_t k) const {
    const int64_t i = n * w.K + k;
    return _mm256_mul_ps(lookup16(codes8(w.packed + i / 2), table), _mm256_set1_ps(w.scale(i >> block_shift)));
  }
  float tail(int64_t n, int64_t k) const { return 0.f; }
};
#endif

at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, c10::string_view quant_type, at::IntArrayRef weight_shape,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double nested_offset,
                           int64_t nested_blocksize) {
  const Weight4Tensors weight = validated_weight4(x, packed, absmax, blocksize, quant_type, weight_shape, bias,
                                                  nested_absmax, nested_code, nested_offset, nested_blocksize);
  const int64_t N = weight.view.N, K = weight.view.K;
  const Weight4& w = weight.view;
  const int64_t M = row_count(x);
  const at::Tensor x2 = flatten_rows(x).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x2.options());
  if (M > 0 && N > 0) {
    // The vector kernels need K to be a multiple of the blocksize: every row starts on a byte and a block never
    // spans two rows.
    [[maybe_unused]] const bool blocked_rows = K % blocksize == 0;
    [[maybe_unused]] const CpuIsa isa = cpu_isa();
    if (K == 0) {
      out.zero_();
#if LOWBIT_X86
    } else if (blocked_rows && isa >= CpuIsa::avx512 && M <= kMaxFusedRows) {
      gemv_avx512(w, x2.const_data_ptr<float>(), M, out.data_ptr<float>());
    } else if (blocked_rows && isa >= CpuIsa::avx512) {
      panel_gemm(N, K, x2.const_data_ptr<float>(), M, out.data_ptr<float>(),
                 [&](int64_t n0, int64_t rows, float* panel) { decode_4bit_panel(w, n0, rows, panel); });
    } else if (blocked_rows && isa == CpuIsa::avx2 && M <= kMaxAvx2GemvRows) {
      gemv_avx2(w, x2.const_data_ptr<float>(), M, out.data_ptr<float>());
    } else if (blocked_rows && isa == CpuIsa::avx2) {
      panel_gemm_avx2(N, K, x2.const_data_ptr<float>(), M, out.data_ptr<float>(),
                      Weight4Decoder{w, load_table16(w.table), __builtin_ctzll(static_cast<uint64_t>(blocksize))});
#endif
#if LOWBIT_ARM
    } else if (blocked_rows && isa >= CpuIsa::neon && M <= kMaxNeonGemvRows) {
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        neon::gemv_4bit(w, x2.const_data_ptr<float>(), M, out.data_ptr<float>(), n0, n1);
      });
    } else if (blocked_rows && isa >= CpuIsa::neon) {
      gemm_slabs(N, K, x2, out, [&](int64_t n0, int64_t n1, float* dst) { neon::decode_4bit_rows(w, n0, n1, dst); });
#endif
    } else if (M > kMaxPortableGemvRows) {
      gemm_slabs(w.N, w.K, x2, out, [&](int64_t n0, int64_t n1, float* dst) {
        for (int64_t n = n0; n < n1; ++n) dequantize_row(w, n, dst + (n - n0) * w.K);
      });
    } else {
      gemv_portable(w, x2.const_data_ptr<float>(), M, out.data_ptr<float>());
    }
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type()).reshape(linear_output_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("linear_4bit", &linear_4bit_cpu); }

}  // namespace lowbit

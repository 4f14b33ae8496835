// The aarch64 NEON kernels (csrc/cpu/nibbles_neon.h, csrc/cpu/int8_neon.h) against the formats' own definitions and
// plain loops, on fresh random inputs with awkward sizes. No ATen and no Python: scripts/arm_check.sh cross-compiles
// this for aarch64 and runs it under qemu-user, once on a CPU with the dot product instructions and once without.
//
// Exactness: the decodes must match Weight4::value bit for bit. The GEMVs sum in their own order, so they run on
// inputs whose every product and partial sum is an integer below 2^24 (a table of small integers, power-of-two
// scales, integer x): float arithmetic is exact there in any order, so any difference is a kernel's error, not
// rounding. One more GEMV case runs the real NF4 table on random floats, within the worst-case bound of float
// summation. The int8 products are exact integers and are compared exactly, -128 included.
//
// Usage: neon_kernels_test [--expect-dotprod=0|1]; exits non-zero on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/int8_neon.h"
#include "cpu/isa.h"
#include "cpu/nibbles_neon.h"
#include "formats.h"

using namespace lowbit;

namespace {

int failures = 0, checks = 0;
std::mt19937 rng;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("FAIL %s (%lld, %lld, %lld)\n", what, a, b, c);
}

int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Weight4Data {
  std::vector<uint8_t> packed, absmax_q;
  std::vector<float> absmax, nested_absmax, nested_code;
  Weight4 view{};
};

// A random N x K 4-bit weight (K a multiple of blocksize) with the given table, plain or double-quantized scales.
// Plain scales are powers of two when `exact` (so every product is exact).
Weight4Data random_weight4(int64_t N, int64_t K, int64_t blocksize, const float* table, bool nested, bool exact) {
  Weight4Data d;
  const int64_t blocks = N * K / blocksize;
  d.packed.resize(N * K / 2);
  for (auto& byte : d.packed) byte = static_cast<uint8_t>(uniform(0, 255));
  Weight4& w = d.view;
  w.packed = d.packed.data();
  w.N = N;
  w.K = K;
  w.blocksize = blocksize;
  std::memcpy(w.table, table, sizeof(w.table));
  if (!nested) {
    d.absmax.resize(blocks);
    for (auto& s : d.absmax) s = exact ? std::ldexp(1.f, uniform(-3, 3)) : std::uniform_real_distribution<float>(0.01f, 3.f)(rng);
    w.absmax = d.absmax.data();
    return d;
  }
  const int64_t nested_blocksize = 256;
  d.absmax_q.resize(blocks);
  for (auto& q : d.absmax_q) q = static_cast<uint8_t>(uniform(0, 255));
  d.nested_code.resize(256);
  for (auto& c : d.nested_code) c = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  d.nested_absmax.resize((blocks + nested_blocksize - 1) / nested_blocksize);
  for (auto& a : d.nested_absmax) a = std::uniform_real_distribution<float>(0.01f, 2.f)(rng);
  w.absmax_q = d.absmax_q.data();
  w.nested_absmax = d.nested_absmax.data();
  w.nested_code = d.nested_code.data();
  w.nested_offset = 0.25f;
  w.nested_blocksize = nested_blocksize;
  return d;
}

// Weight4::value for every element: the definition every device's decode must match.
std::vector<float> decoded(const Weight4& w) {
  std::vector<float> out(w.N * w.K);
  for (int64_t i = 0; i < w.N * w.K; ++i) out[i] = w.value(i, w.scale(i / w.blocksize));
  return out;
}

void check_decode(int64_t N, int64_t K, int64_t blocksize, const float* table, bool nested) {
  const Weight4Data d = random_weight4(N, K, blocksize, table, nested, false);
  const std::vector<float> want = decoded(d.view);
  std::vector<float> got(N * K, NAN);
  const int64_t n0 = N / 3;  // a row range that does not start at 0
  neon::decode_4bit_rows(d.view, n0, N, got.data() + n0 * K);
  for (int64_t i = n0 * K; i < N * K; ++i)
    expect(std::memcmp(&got[i], &want[i], sizeof(float)) == 0, "decode_4bit_rows bit for bit", N, K, i);
}

// x of M rows with small integers (exact products) or floats in [-1, 1].
std::vector<float> random_x(int64_t M, int64_t K, bool exact) {
  std::vector<float> x(M * K);
  for (auto& v : x) v = exact ? static_cast<float>(uniform(-8, 8)) : std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  return x;
}

// Compares out (M x N) with a double-precision product of w_rows (N x K, float) and x: exactly when `exact`, else
// within the worst-case error of float summation over K terms (K * 2^-24 of the sum of |products|, twice over).
void compare_product(const std::vector<float>& out, const std::vector<float>& w_rows, const std::vector<float>& scale,
                     const std::vector<float>& x, int64_t M, int64_t N, int64_t K, bool exact, const char* what) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0, magnitude = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(w_rows[n * K + k]) * x[m * K + k];
        sum += p;
        magnitude += std::fabs(p);
      }
      const double s = scale.empty() ? 1.0 : scale[n];
      const double got = out[m * N + n], want = sum * s;
      const bool ok = exact ? got == want : std::fabs(got - want) <= 2.0 * K * std::ldexp(1.0, -24) * magnitude * s + 1e-30;
      expect(ok, what, M, N, m * N + n);
    }
}

void check_gemv_4bit(int64_t M, int64_t N, int64_t K, int64_t blocksize, const float* table, bool exact) {
  const Weight4Data d = random_weight4(N, K, blocksize, table, false, exact);
  const std::vector<float> w = decoded(d.view), x = random_x(M, K, exact);
  std::vector<float> out(M * N, NAN);
  // Two row ranges, as two threads would take them.
  neon::gemv_4bit(d.view, x.data(), M, out.data(), 0, N / 2);
  neon::gemv_4bit(d.view, x.data(), M, out.data(), N / 2, N);
  compare_product(out, w, {}, x, M, N, K, exact, exact ? "gemv_4bit exact" : "gemv_4bit nf4");
}

void check_int8_weight_gemv(int64_t M, int64_t N, int64_t K) {
  std::vector<int8_t> CB(N * K);
  for (auto& c : CB) c = static_cast<int8_t>(uniform(-127, 127));
  std::vector<float> scale(N), w(N * K);
  for (auto& s : scale) s = std::ldexp(1.f, uniform(-9, -5));
  for (int64_t i = 0; i < N * K; ++i) w[i] = CB[i];
  const std::vector<float> x = random_x(M, K, true);
  std::vector<float> out(M * N, NAN);
  neon::int8_weight_gemv(CB.data(), scale.data(), x.data(), M, N, K, out.data(), 0, N / 2);
  neon::int8_weight_gemv(CB.data(), scale.data(), x.data(), M, N, K, out.data(), N / 2, N);
  compare_product(out, w, scale, x, M, N, K, true, "int8_weight_gemv exact");
}

void check_int8_gemm(int64_t M, int64_t N, int64_t K, bool dotprod) {
  std::vector<int8_t> a(M * K), b(N * K);
  // Extremes included: -128 x -128 is the one product int16 barely holds.
  for (auto& v : a) v = static_cast<int8_t>(uniform(0, 9) == 0 ? -128 : uniform(-128, 127));
  for (auto& v : b) v = static_cast<int8_t>(uniform(0, 9) == 0 ? -128 : uniform(-128, 127));
  std::vector<int32_t> out(M * N, 0x7F7F7F7F);
  const int64_t split = N / 3;
  for (auto [n0, n1] : {std::pair<int64_t, int64_t>{0, split}, {split, N}}) {
    if (dotprod)
      neon::int8_gemm_dotprod(a.data(), b.data(), M, N, K, out.data(), n0, n1);
    else
      neon::int8_gemm(a.data(), b.data(), M, N, K, out.data(), n0, n1);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t want = 0;
      for (int64_t k = 0; k < K; ++k) want += int64_t(a[m * K + k]) * b[n * K + k];
      expect(out[m * N + n] == want, dotprod ? "int8_gemm_dotprod exact" : "int8_gemm exact", M, N, m * N + n);
    }
}

}  // namespace

int main(int argc, char** argv) {
  int expect_dotprod = -1;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--expect-dotprod=", 17) == 0) expect_dotprod = std::atoi(argv[i] + 17);
  const unsigned seed = std::random_device{}();
  rng.seed(seed);
  const bool dotprod = detected_isa() == CpuIsa::dotprod;
  std::printf("neon kernels: seed %u, detected level %s\n", seed, isa_name(detected_isa()));
  if (expect_dotprod >= 0 && dotprod != (expect_dotprod == 1)) {
    std::printf("FAIL: expected dotprod=%d, detected %s\n", expect_dotprod, isa_name(detected_isa()));
    return 1;
  }

  float small_integers[16];
  for (int i = 0; i < 16; ++i) small_integers[i] = static_cast<float>(i - 8);
  for (const Codebook4* book : {&codebook(QuantType::NF4), &codebook(QuantType::FP4)})
    for (bool nested : {false, true})
      for (int64_t blocksize : {32, 64, 256})
        for (int64_t N : {1, 7, 17}) check_decode(N, blocksize * uniform(1, 4), blocksize, book->value, nested);

  for (int64_t M : {1, 2, 3, 4, 5, 8, 9})
    for (int64_t N : {1, 5, 17, 33})
      for (int64_t blocksize : {32, 128}) {
        check_gemv_4bit(M, N, blocksize * uniform(1, 8), blocksize, small_integers, true);
        check_gemv_4bit(M, N, blocksize * uniform(1, 8), blocksize, codebook(QuantType::NF4).value, false);
      }

  for (int64_t M : {1, 2, 3, 4, 7, 16})
    for (int64_t N : {1, 5, 17})
      for (int64_t K : {1, 15, 16, 17, 100, 1025}) check_int8_weight_gemv(M, N, K);

  for (bool with_dotprod : {false, true}) {
    if (with_dotprod && !dotprod) continue;
    for (int64_t M : {1, 3, 4, 5, 9, 17})
      for (int64_t N : {1, 4, 7, 17, 33})
        for (int64_t K : {1, 15, 16, 17, 64, 1025}) check_int8_gemm(M, N, K, with_dotprod);
  }
  // Rows of a beyond one pass (256 KiB of a per pass: K = 4096 gives 64 rows).
  check_int8_gemm(67, 9, 4096, false);
  if (dotprod) check_int8_gemm(67, 9, 4096, true);

  std::printf("neon kernels: %d checks, %d failed%s\n", checks, failures, dotprod ? "" : " (dotprod kernels skipped: CPU lacks them)");
  return failures ? 1 : 0;
}

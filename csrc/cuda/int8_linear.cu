// LLM.int8() linear on CUDA: y = (Xq @ CB.T) * row_stat * (SCB / 127^2) + X[:, outliers] @ W[:, outliers].T + bias,
// with the CPU kernel's float32 arithmetic (cuda/int8.cuh) and no host synchronisation, threshold or not: the
// outlier columns stay on the device as an ascending list and a count (int8_vectorwise_quant.cu), and every
// kernel reads the count itself. So the op is captured by CUDA graphs and compiled whole by torch.compile.
//  * M <= kMaxGemvRows (decode): one GEMV kernel. At M = 1 the weight's bytes are the whole cost, so each
//    warp streams one weight row with 16-byte cache-streaming loads (read once; the few activation rows
//    stay in L1), multiplies 4 int8 pairs per __dp4a into exact int32 sums per row of x, reduces across the
//    warp, then adds the outlier columns (the lanes split the list; each entry is one byte of the row just
//    streamed, so it hits cache) and the bias, and stores x's dtype. K % 16 != 0 or a misaligned weight
//    take the same kernel with byte loads.
//  * larger M: the int8 product on tensor cores (int8_mm.cu: cuBLASLt IMMA), then one epilogue kernel that
//    reads the int32 product once, rescales it, adds the outlier columns' product (staged through shared
//    memory 32 columns at a time, so it costs nothing without outliers and stays exact with any number of
//    them) and the bias, and writes x's dtype. That int32 round trip through memory (8 bytes per output
//    read + written beyond the output itself) is what remains to remove: cuBLASLt cannot apply a per-row and
//    a per-column float scale to an int32 accumulator and write bf16; an IMMA kernel of our own (or CUTLASS)
//    with this epilogue fused would.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>

#include "cuda/int8.cuh"
#include "cuda/launch.cuh"
#include "rows.h"
#include "validate.h"

namespace lowbit::cuda {
namespace {

// Rows of x up to which the GEMV beats quantize + cuBLASLt + epilogue. PROVISIONAL: the same cut-over as
// the 4-bit GEMV, until benchmarks/bench_cuda.py measures both paths on a GPU (it moves the cut-over with
// LOWBIT_INT8_GEMV_MAX_ROWS to time each path at every M; the GEMV takes kMaxGemvRows rows per pass over
// the weight, so above that it re-streams the weight once per group of rows).
constexpr int kMaxGemvRows = 8;

int64_t gemv_max_rows() {
  const char* setting = std::getenv("LOWBIT_INT8_GEMV_MAX_ROWS");
  return setting ? std::atoll(setting) : kMaxGemvRows;
}
constexpr int kGemvWarps = 8;  // one weight row per warp
constexpr int kWeightBytesPerLoad = 16;

// The epilogue's output tile: 64 columns (a warp's 2 x 32 coalesced int32 loads per row) x 32 rows, 4 row
// groups of threads, 8 outputs per thread; outlier columns staged kOutlierChunk at a time.
constexpr int kEpilogueCols = 64;
constexpr int kEpilogueRows = 32;
constexpr int kEpilogueRowThreads = 4;
constexpr int kOutlierChunk = 32;

// The bias read in its own dtype inside the kernels (a cast to float32 first was one more launch a decode step) and
// widened to float32 there, which is exact, as the CPU kernel adds it before the final rounding.
struct BiasView {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  __device__ float value(int64_t n) const {
    if (!data) return 0.f;
    if (dtype == at::kHalf) return static_cast<float>(static_cast<const at::Half*>(data)[n]);
    if (dtype == at::kBFloat16) return static_cast<float>(static_cast<const at::BFloat16*>(data)[n]);
    return static_cast<const float*>(data)[n];
  }
};

template <typename T>
struct Int8LinearArgs {
  const T* x;                 // [M, K]: the outlier columns' values
  const int8_t* codes;        // [M, K]: int8_vectorwise_quant's codes of x
  const float* row_stats;     // [M]
  const int8_t* weight;       // CB [N, K]
  const float* weight_scale;  // SCB [N]
  BiasView bias;              // [N] in its own dtype, or none
  OutlierColumns outliers;
  const int32_t* product;  // [M, N] int32 Xq @ CB.T (large-M path only)
  T* out;                  // [M, N]
  int64_t M, N, K;
};

template <typename V>
__device__ inline V warp_sum(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// kRows rows of x a CTA, rows row0 + blockIdx.y * kRows on: the row count is a template argument so every loop over
// rows unrolls without a bounds test (a runtime count kept each of the rows' dp4a chains behind a branch).
template <typename T, bool kVectorLoads, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32) int8_gemv_kernel(const Int8LinearArgs<T> a, int64_t row0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (n >= a.N) return;  // the whole warp: the shuffles below stay full-warp
  const int64_t first = row0 + static_cast<int64_t>(blockIdx.y) * kRows;
  const int8_t* codes = a.codes + first * a.K;
  const T* x = a.x + first * a.K;
  const int8_t* weight_row = a.weight + n * a.K;
  int32_t acc[kRows] = {};
  if constexpr (kVectorLoads) {
    const int4* weight_chunks = reinterpret_cast<const int4*>(weight_row);
    const int64_t chunks = a.K / kWeightBytesPerLoad;
#pragma unroll 2
    for (int64_t c = lane; c < chunks; c += 32) {
      const int4 w = __ldcs(weight_chunks + c);
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        const int4 q = __ldg(reinterpret_cast<const int4*>(codes + m * a.K) + c);
        acc[m] = __dp4a(w.w, q.w, __dp4a(w.z, q.z, __dp4a(w.y, q.y, __dp4a(w.x, q.x, acc[m]))));
      }
    }
  } else {
    for (int64_t k = lane; k < a.K; k += 32) {
      const int32_t w = weight_row[k];
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[m] += w * static_cast<int32_t>(codes[m * a.K + k]);
    }
  }
  const int n_outliers = a.outliers.size();
  const float weight_scale = a.weight_scale[n];
  const float bias = a.bias.value(n);
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    const int32_t total = warp_sum(acc[m]);
    float outlier_sum = 0.f;
    for (int j = lane; j < n_outliers; j += 32) {
      const int32_t k = a.outliers.columns[j];
      outlier_sum = fmaf(static_cast<float>(x[m * a.K + k]), outlier_weight(weight_row[k], weight_scale), outlier_sum);
    }
    outlier_sum = warp_sum(outlier_sum);
    if (lane == 0)
      a.out[(first + m) * a.N + n] =
          static_cast<T>(int8_output(total, a.row_stats[first + m], weight_scale, outlier_sum, bias));
  }
}

template <typename T>
__global__ void __launch_bounds__(kEpilogueCols * kEpilogueRowThreads) int8_epilogue_kernel(const Int8LinearArgs<T> a) {
  __shared__ float x_outliers[kEpilogueRows][kOutlierChunk + 1];  // +1: rows read down a column hit distinct banks
  __shared__ float w_outliers[kOutlierChunk][kEpilogueCols];
  constexpr int kThreads = kEpilogueCols * kEpilogueRowThreads;
  constexpr int kRowsPerThread = kEpilogueRows / kEpilogueRowThreads;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kEpilogueCols + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kEpilogueRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kEpilogueCols;
  const int64_t n = n0 + tx;
  float outlier_sum[kRowsPerThread] = {};
  const int n_outliers = a.outliers.size();  // the same for every thread: the barriers below are uniform
  for (int c0 = 0; c0 < n_outliers; c0 += kOutlierChunk) {
    const int chunk = min(kOutlierChunk, n_outliers - c0);
    for (int i = tid; i < kEpilogueRows * kOutlierChunk; i += kThreads) {
      const int r = i / kOutlierChunk, j = i % kOutlierChunk;
      const int64_t m = m0 + r;
      x_outliers[r][j] = m < a.M && j < chunk ? static_cast<float>(a.x[m * a.K + a.outliers.columns[c0 + j]]) : 0.f;
    }
    for (int i = tid; i < kOutlierChunk * kEpilogueCols; i += kThreads) {
      const int j = i / kEpilogueCols, c = i % kEpilogueCols;
      const int64_t col = n0 + c;
      w_outliers[j][c] = col < a.N && j < chunk
                             ? outlier_weight(a.weight[col * a.K + a.outliers.columns[c0 + j]], a.weight_scale[col])
                             : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < chunk; ++j) {
      const float w = w_outliers[j][tx];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        outlier_sum[i] = fmaf(x_outliers[ty + i * kEpilogueRowThreads][j], w, outlier_sum[i]);
    }
    __syncthreads();
  }
  if (n >= a.N) return;
  const float weight_scale = a.weight_scale[n];
  const float bias = a.bias.value(n);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + ty + i * kEpilogueRowThreads;
    if (m < a.M)
      a.out[m * a.N + n] =
          static_cast<T>(int8_output(a.product[m * a.N + n], a.row_stats[m], weight_scale, outlier_sum[i], bias));
  }
}

// groups CTAs of kRows rows each along blockIdx.y, from row row0.
template <typename T, int kRows>
void launch_gemv_rows(const Int8LinearArgs<T>& a, int64_t row0, int64_t groups, bool vector_loads) {
  TORCH_CHECK_VALUE(groups <= 65535, "lowbit.int8_linear: too many rows (", a.M, ") for the GEMV path");
  const dim3 grid(grid_size(ceil_div(a.N, kGemvWarps), "lowbit.int8_linear"), static_cast<unsigned int>(groups));
  if (vector_loads)
    int8_gemv_kernel<T, true, kRows><<<grid, kGemvWarps * 32, 0, current_stream()>>>(a, row0);
  else
    int8_gemv_kernel<T, false, kRows><<<grid, kGemvWarps * 32, 0, current_stream()>>>(a, row0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One launch for M <= kMaxGemvRows; beyond (only when the cut-over is raised to measure it), groups of
// kMaxGemvRows rows and one launch for the rest.
template <typename T>
void launch_gemv(const Int8LinearArgs<T>& a) {
  // Whole 16-byte chunks per row: K % 16 == 0 and a 16-byte aligned weight (the codes are a fresh tensor).
  if (a.K % kWeightBytesPerLoad == 0 && !aligned16(a.weight))
    TORCH_WARN_ONCE("lowbit.int8_linear: the int8 weight (CB) is not 16-byte aligned (a view into a larger buffer?), ",
                    "so the decode GEMV reads it a byte at a time, several times slower: keep each weight in a tensor ",
                    "of its own (.clone() it once)");
  const bool vector_loads = a.K % kWeightBytesPerLoad == 0 && aligned16(a.weight) && aligned16(a.codes);
  const int64_t full = a.M / kMaxGemvRows, rest = a.M % kMaxGemvRows;
  if (full > 0) launch_gemv_rows<T, kMaxGemvRows>(a, 0, full, vector_loads);
  const int64_t row0 = full * kMaxGemvRows;
  if (rest > 0)
    with_row_count(rest, [&](auto rows) { launch_gemv_rows<T, decltype(rows)::value>(a, row0, 1, vector_loads); });
}

template <typename T>
void launch_epilogue(const Int8LinearArgs<T>& a) {
  const int64_t column_tiles = ceil_div(a.N, kEpilogueCols);
  TORCH_CHECK_VALUE(column_tiles <= 65535, "lowbit.int8_linear: too many output features (", a.N, ") for one launch");
  const dim3 grid(grid_size(ceil_div(a.M, kEpilogueRows), "lowbit.int8_linear"),
                  static_cast<unsigned int>(column_tiles));
  int8_epilogue_kernel<T><<<grid, dim3(kEpilogueCols, kEpilogueRowThreads), 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                            const std::optional<at::Tensor>& bias) {
  validate_int8_linear(x, CB, SCB, threshold, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = CB.size(0), K = CB.size(1);
  const int64_t M = row_count(x);
  const std::vector<int64_t> out_shape = linear_output_shape(x, N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  const at::Tensor x2 = flatten_rows(x).contiguous();
  const at::Tensor weight = CB.contiguous(), weight_scale = SCB.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const BiasView bias_view = bias_c.defined() ? BiasView{bias_c.const_data_ptr(), bias_c.scalar_type()} : BiasView{};
  const Int8Activations act = quantize_activations(x2, threshold, /*list_outliers=*/true);
  const OutlierColumns outliers =
      act.outlier_count.defined()
          ? OutlierColumns{act.outlier_columns.const_data_ptr<int32_t>(), act.outlier_count.const_data_ptr<int32_t>()}
          : OutlierColumns{nullptr, nullptr};
  const bool gemv = M <= gemv_max_rows();
  const at::Tensor product = gemv ? at::Tensor() : int8_matmul(act.codes, weight);
  LOWBIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_linear_cuda", [&] {
    const Int8LinearArgs<scalar_t> args{x2.const_data_ptr<scalar_t>(),
                                        act.codes.const_data_ptr<int8_t>(),
                                        act.row_stats.const_data_ptr<float>(),
                                        weight.const_data_ptr<int8_t>(),
                                        weight_scale.const_data_ptr<float>(),
                                        bias_view,
                                        outliers,
                                        gemv ? nullptr : product.const_data_ptr<int32_t>(),
                                        out.data_ptr<scalar_t>(),
                                        M,
                                        N,
                                        K};
    if (gemv)
      launch_gemv(args);
    else
      launch_epilogue(args);
  });
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("int8_linear", &int8_linear_cuda); }

}  // namespace lowbit::cuda

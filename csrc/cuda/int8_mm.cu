// Exact int8 x int8 -> int32 matmul on CUDA (A [M, K] @ B[N, K].T), the int8_mm op and the product under
// int8_linear's large-M path.
//  * cuBLASLt on int8 tensor cores (IMMA) wherever it takes the shape: its int8 kernels in the plain
//    (column-major) order need the "TN" layout, 4-byte aligned pointers, leading dimensions and m, k
//    multiples of 4. Row-major A [M, K] and B [N, K] are column-major K x M and K x N, so C^T [N, M]
//    (= row-major C [M, N]) is op(B') = B'^T times A': transa = T, m = N, n = M, k = K. Rule: K % 4 == 0,
//    N % 4 == 0, A and B 16-byte aligned (the wide-load kernels), and the heuristic, told the buffers' real
//    alignment, finds an algorithm (its answer is cached per problem); the workspace comes from PyTorch's
//    caching allocator on the current stream (graph-capturable).
//    Integer accumulation is exact, so every algorithm gives the same bits.
//  * anything else (K = 17, N odd, an offset view's pointer, no algorithm): a shared-memory tiled kernel on
//    CUDA cores, exact too; slow, but only odd shapes reach it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "cuda/int8.cuh"
#include "cuda/launch.cuh"
#include "validate.h"

namespace lowbit::cuda {
namespace {

// Hopper's large-tile IMMA kernels use a few MiB at most; split-K ones more. 32 MiB is what PyTorch gives
// its own cuBLASLt calls on Hopper; the caching allocator hands the block back after the call.
constexpr uint64_t kMaxWorkspaceBytes = 32ull << 20;

constexpr int kTile = 32;         // outputs per tile side, and the K step staged in shared memory
constexpr int kTileRowWarps = 8;  // a 32 x 8 CTA: each thread keeps 4 accumulators of one output column

#define LOWBIT_CUBLASLT_CHECK(expr)                                                                   \
  do {                                                                                               \
    const cublasStatus_t lowbit_status = (expr);                                                     \
    TORCH_CHECK(lowbit_status == CUBLAS_STATUS_SUCCESS, "lowbit.int8_mm: ", #expr, " failed: ",      \
                cublasLtGetStatusString(lowbit_status));                                             \
  } while (0)

// cuBLASLt descriptors, destroyed on every exit (a TORCH_CHECK throws).
template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
struct Owned {
  Handle handle = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (handle) Destroy(handle);
  }
};
using MatmulDesc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// One cuBLASLt handle per device, made on first use and kept for the process (a handle carries no stream;
// the call passes the current one). lowbit keeps its own rather than PyTorch's: ATen's CUDAContext header
// pulls in cuSPARSE/cuSOLVER headers that a bare toolkit or the CI's CPU torch may lack.
cublasLtHandle_t lt_handle() {
  static std::mutex mutex;
  static std::vector<cublasLtHandle_t> handles;
  const auto device = static_cast<size_t>(c10::cuda::current_device());
  const std::lock_guard<std::mutex> lock(mutex);
  if (handles.size() <= device) handles.resize(device + 1, nullptr);
  if (!handles[device]) LOWBIT_CUBLASLT_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

bool cublaslt_takes(const at::Tensor& A, const at::Tensor& B) {
  const int64_t K = A.size(1), N = B.size(0);
  return K % 4 == 0 && N % 4 == 0 && aligned16(A.const_data_ptr()) && aligned16(B.const_data_ptr());
}

// The largest power of two up to 256 dividing the address. cuBLASLt's heuristic assumes 256-byte aligned
// buffers unless told otherwise, and may pick a kernel that needs them.
uint32_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t bytes = 256;
  while (address % bytes) bytes /= 2;
  return bytes;
}

// What cuBLASLt's choice depends on here (types, layouts and transposes are fixed by the shape).
struct Problem {
  int device;
  int64_t M, N, K;
  uint32_t weight_alignment, input_alignment, output_alignment;
  bool operator==(const Problem&) const = default;
};

struct ProblemHash {
  size_t operator()(const Problem& p) const {
    size_t h = std::hash<int64_t>()(p.M);
    for (const int64_t v : {int64_t{p.device}, p.N, p.K, int64_t{p.weight_alignment}, int64_t{p.input_alignment},
                            int64_t{p.output_alignment}})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

// cuBLASLt's pick for a problem, or none, asked once per problem: the heuristic query costs host time that
// a decode step or a small prefill would otherwise pay on every call. (One entry per distinct M seen.)
std::optional<cublasLtMatmulHeuristicResult_t> best_algorithm(cublasLtHandle_t lt, const Problem& problem,
                                                              cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t weight,
                                                              cublasLtMatrixLayout_t input,
                                                              cublasLtMatrixLayout_t output) {
  static std::mutex mutex;
  static std::unordered_map<Problem, std::optional<cublasLtMatmulHeuristicResult_t>, ProblemHash> chosen;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = chosen.find(problem); it != chosen.end()) return it->second;
  Preference preference;
  LOWBIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&preference.handle));
  const auto prefer = [&](cublasLtMatmulPreferenceAttributes_t attribute, const auto& value) {
    LOWBIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.handle, attribute, &value, sizeof(value)));
  };
  prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspaceBytes);
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, problem.weight_alignment);
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, problem.input_alignment);
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, problem.output_alignment);
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, problem.output_alignment);
  cublasLtMatmulHeuristicResult_t best{};
  int found = 0;
  const cublasStatus_t searched =
      cublasLtMatmulAlgoGetHeuristic(lt, op, weight, input, output, output, preference.handle, 1, &best, &found);
  if (searched != CUBLAS_STATUS_NOT_SUPPORTED) LOWBIT_CUBLASLT_CHECK(searched);
  std::optional<cublasLtMatmulHeuristicResult_t> answer;
  if (searched == CUBLAS_STATUS_SUCCESS && found > 0) answer = best;
  chosen.emplace(problem, answer);
  return answer;
}

// C = A @ B.T through cuBLASLt; false (C untouched) when no algorithm takes the problem.
bool matmul_cublaslt(const at::Tensor& A, const at::Tensor& B, at::Tensor& C) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(0);
  const cublasLtHandle_t lt = lt_handle();
  MatmulDesc op;
  LOWBIT_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&op.handle, CUBLAS_COMPUTE_32I, CUDA_R_32I));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  LOWBIT_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(op.handle, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  Layout weight, input, output;  // B as K x N, A as K x M, C as N x M, all column-major
  LOWBIT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&weight.handle, CUDA_R_8I, K, N, K));
  LOWBIT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&input.handle, CUDA_R_8I, K, M, K));
  LOWBIT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&output.handle, CUDA_R_32I, N, M, N));
  const Problem problem{A.get_device(), M, N, K, alignment(B.const_data_ptr()), alignment(A.const_data_ptr()),
                        alignment(C.const_data_ptr())};
  const std::optional<cublasLtMatmulHeuristicResult_t> best =
      best_algorithm(lt, problem, op.handle, weight.handle, input.handle, output.handle);
  if (!best) return false;
  const at::Tensor workspace = at::empty({static_cast<int64_t>(best->workspaceSize)}, A.options().dtype(at::kByte));
  const int32_t alpha = 1, beta = 0;
  LOWBIT_CUBLASLT_CHECK(cublasLtMatmul(lt, op.handle, &alpha, B.const_data_ptr(), weight.handle, A.const_data_ptr(),
                                       input.handle, &beta, C.data_ptr(), output.handle, C.data_ptr(), output.handle,
                                       &best->algo, workspace.data_ptr(), best->workspaceSize, current_stream()));
  return true;
}

// A 32 x 32 output tile per CTA: 32-wide K slices of A's rows and B's rows staged in shared memory (zero
// past the edges, so any M, N, K works), each thread summing 4 outputs of one column in int32.
__global__ void __launch_bounds__(kTile * kTileRowWarps)
    int8_mm_tiled_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int32_t* __restrict__ C,
                         int64_t M, int64_t N, int64_t K) {
  __shared__ int8_t a_tile[kTile][kTile + 1];  // [row of A][k]; +1 staggers the rows across banks
  __shared__ int8_t b_tile[kTile][kTile + 1];  // [row of B][k]
  constexpr int kRowsPerThread = kTile / kTileRowWarps;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  int32_t acc[kRowsPerThread] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k = k0 + tx;
    for (int r = ty; r < kTile; r += kTileRowWarps) {
      a_tile[r][tx] = m0 + r < M && k < K ? A[(m0 + r) * K + k] : int8_t{0};
      b_tile[r][tx] = n0 + r < N && k < K ? B[(n0 + r) * K + k] : int8_t{0};
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const int32_t b = b_tile[tx][kk];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += static_cast<int32_t>(a_tile[ty + i * kTileRowWarps][kk]) * b;
    }
    __syncthreads();
  }
  const int64_t n = n0 + tx;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + ty + i * kTileRowWarps;
    if (m < M && n < N) C[m * N + n] = acc[i];
  }
}

void matmul_tiled(const at::Tensor& A, const at::Tensor& B, at::Tensor& C) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(0);
  const int64_t column_tiles = ceil_div(N, kTile);
  TORCH_CHECK_VALUE(column_tiles <= 65535, "lowbit.int8_mm: B has too many rows (", N, ") for one launch");
  const dim3 grid(grid_size(ceil_div(M, kTile), "lowbit.int8_mm"), static_cast<unsigned int>(column_tiles));
  int8_mm_tiled_kernel<<<grid, dim3(kTile, kTileRowWarps), 0, current_stream()>>>(
      A.const_data_ptr<int8_t>(), B.const_data_ptr<int8_t>(), C.data_ptr<int32_t>(), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor int8_matmul(const at::Tensor& A, const at::Tensor& B) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(0);
  at::Tensor C = at::empty({M, N}, A.options().dtype(at::kInt));
  if (M == 0 || N == 0) return C;
  if (K == 0) return C.zero_();
  if (!(cublaslt_takes(A, B) && matmul_cublaslt(A, B, C))) matmul_tiled(A, B, C);
  return C;
}

namespace {

at::Tensor int8_mm_cuda(const at::Tensor& A, const at::Tensor& B) {
  validate_int8_mm(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  return int8_matmul(A.contiguous(), B.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("int8_mm", &int8_mm_cuda); }

}  // namespace lowbit::cuda

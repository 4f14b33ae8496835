// y = x @ dequant(W).T + bias for a 4-bit weight on CUDA. Two regimes, as on the CPU:
//  * few rows of x (decode, M <= kMaxGemvRows): a fused dequantize-GEMV that reads the bitsandbytes
//    layout as stored. At M = 1 the weight's bytes are the whole cost (0.5625 B per weight with float32
//    absmax per 64), so the kernel exists to stream them at HBM bandwidth (gemv_4bit_split_kernel, below, in two
//    decodes; the first design, gemv_4bit_kernel, stays selectable: LOWBIT_GEMV, and a GPU run times all three).
//    Needs K % 32 == 0 (rows start on 16-byte boundaries, and a 32-weight chunk never spans two blocks even
//    where blocks span rows: block boundaries are multiples of blocksize >= 32) and 16-byte aligned tensors;
//    other shapes take the path below.
//  * everything else: dequantize the weight into x's dtype and call cuBLAS through at::linear, so the
//    dequantization is amortized over the M rows.
// Not yet here (measured on a GPU first): a tensor-core kernel for medium M.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cuda/dequantize_4bit.cuh"
#include "cuda/launch.cuh"
#include "formats.h"
#include "rows.h"
#include "validate.h"
#include "weight4.h"

namespace lowbit {
namespace {

constexpr int kMaxGemvRows = 8;
constexpr int kGemvWarps = 4;
constexpr int kChunk = 32;  // weights per 16-byte load

// 32 consecutive values of x as floats, in 16-byte loads (p is 16-byte aligned).
template <typename T>
__device__ inline void load_chunk(const T* __restrict__ p, float* out) {
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < kChunk / kPerLoad; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    T values[kPerLoad];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) out[v * kPerLoad + j] = static_cast<float>(values[j]);
  }
}

// acc[m * stride] += scale * (the 32 decoded weights of chunk c . the same 32 values of row m of x), for each row;
// unless !valid (a lane past the row, which reads a chunk of it again and discards the product: a select, not a
// branch, so the warp stays converged for its shuffles).
template <typename T, int M>
__device__ inline void accumulate_chunk(const float* weights, const T* __restrict__ x, int64_t K, int64_t c, float scale,
                                        float* acc, int stride, bool valid = true) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float xs[kChunk];
    load_chunk(x + m * K + c * kChunk, xs);
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) dot = fmaf(weights[j], xs[j], dot);
    const float sum = fmaf(dot, scale, acc[m * stride]);
    acc[m * stride] = valid ? sum : acc[m * stride];
  }
}

// First design (LOWBIT_GEMV=v1): one warp per output row, 4 warps per CTA, each byte decoded through a 256-entry
// float2 table in shared memory. A review of its SASS found it shared-memory bound (data-dependent LDS.64 into 512
// words: bank conflicts, ~3 wavefronts a load), x reloaded for every output row, and too little in flight (each
// 16-byte load consumed by the next instruction).
template <typename T, int M>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_4bit_kernel(Weight4 w, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out) {
  __shared__ float2 pairs[256];  // byte -> (value of its high nibble, value of its low nibble)
  for (int i = threadIdx.x; i < 256; i += blockDim.x) pairs[i] = make_float2(w.table[i >> 4], w.table[i & 15]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (n >= w.N) return;
  const int64_t chunks = w.K / kChunk;
  const uint4* row = reinterpret_cast<const uint4*>(w.packed + n * (w.K / 2));
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint4 packed = __ldcs(row + c);
    uint8_t bytes[16];
    memcpy(bytes, &packed, sizeof(packed));
    float weights[kChunk];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float2 pair = pairs[bytes[j]];
      weights[2 * j] = pair.x;
      weights[2 * j + 1] = pair.y;
    }
    accumulate_chunk<T, M>(weights, x, w.K, c, w.scale((n * w.K + c * kChunk) / w.blocksize), acc, 1);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) out[m * w.N + n] = static_cast<T>(bias ? v + static_cast<float>(bias[n]) : v);
  }
}

// Second design. Why each choice (H100/H200: 132 SMs, HBM 3.35/4.8 TB/s, ~18/25 KB in flight per SM to cover
// the latency at that rate):
//  * kSplitRows output rows per CTA and the CTA's 4 warps split K between them (split-K inside the CTA, summed
//    through shared memory): short outputs (N = 1024 for k/v) still give N / 2 CTAs, and each 32-weight chunk of
//    x is loaded once for kSplitRows rows instead of once a row.
//  * A chunk's kSplitRows 16-byte weight loads and their scales are issued before any of them is decoded, and the
//    loop is unrolled by two: ptxas (sm_90, 56-62 registers at one row) keeps one or two 16-byte weight loads a
//    lane in flight, and 62 registers allow 8 CTAs (32 warps) an SM: ~16-32 KB in flight, what HBM3/3e latency needs.
//  * Decoding a code to its float32 value is most of the work per weight at M = 1, so it is built two ways and
//    timed on the GPU (LOWBIT_GEMV=lds selects the first; the second is the default):
//    - kShuffle = false: two 4-byte loads a byte from a 16-entry table in shared memory (16 words in 16 banks:
//      lanes reading different codes never conflict, unlike v1's float2 table over 512 words). The SASS spends a
//      shift, a mask and an address add on each: 193 instructions a 16-byte chunk in all (sm_90, one row).
//    - kShuffle = true: each lane holds codebook[lane % 16] in a register and a weight's value is the lane its
//      code names, one __shfl_sync a weight. A shuffle takes its source lane modulo 32, and both half-warps hold
//      the table, so the code needs no mask: a shift a weight, and none for the low nibble of byte 0 (155
//      instructions a chunk). Every lane must run each shuffle, so the chunk loop's trip count is the CTA's, which
//      ptxas can see is uniform (a lane's own count made it wrap every shuffle in reconvergence code).
//  * Block and nested-block indices are shifts (blocksizes are powers of two): no 64-bit division per chunk.
//  * Double-quantized scales decode from a shared copy of the 256-entry nested code, multiply then add in float32
//    (formats.h nested_scale's rounding).
constexpr int kSplitWarps = 4;
constexpr int kSplitRows = 2;

template <typename T, int M, bool kShuffle>
__global__ void __launch_bounds__(kSplitWarps * 32)
    gemv_4bit_split_kernel(Weight4 w, cuda::Shifts shift, const T* __restrict__ x, const T* __restrict__ bias,
                           T* __restrict__ out) {
  __shared__ float table[16];
  __shared__ float nested_code[256];
  __shared__ float partial[kSplitWarps][M][kSplitRows];
  cuda::load_tables(w, table, nested_code);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float lane_code_value = table[lane % 16];  // kShuffle: the value of code `lane % 16`
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSplitRows;
  const int64_t chunks = w.K / kChunk;
  const uint8_t* rows[kSplitRows];
#pragma unroll
  for (int r = 0; r < kSplitRows; ++r) rows[r] = w.packed + min(n0 + r, w.N - 1) * (w.K / 2);  // past N: not written
  float acc[M][kSplitRows] = {};
  // The same trip count for every thread of the CTA (the compiler sees it is uniform, so the shuffles need no
  // reconvergence code); a lane past the row redoes the row's last chunk and discards it.
  const int64_t trips = cuda::ceil_div(chunks, kSplitWarps * 32);
#pragma unroll 2
  for (int64_t trip = 0; trip < trips; ++trip) {
    const int64_t lane_chunk = trip * (kSplitWarps * 32) + threadIdx.x;
    const bool valid = lane_chunk < chunks;
    const int64_t c = valid ? lane_chunk : chunks - 1;
    uint4 packed[kSplitRows];
    float scale[kSplitRows];
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r) {
      packed[r] = __ldcs(reinterpret_cast<const uint4*>(rows[r]) + c);
      scale[r] = cuda::block_scale(w, nested_code, shift, (min(n0 + r, w.N - 1) * w.K + c * kChunk) >> shift.block);
    }
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r) {
      uint32_t words[4];
      memcpy(words, &packed[r], sizeof(words));
      float weights[kChunk];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // byte 4i + q of the chunk: bits 8q..8q+7 of word i, high nibble first
          const uint32_t high = words[i] >> (8 * q + 4), low = words[i] >> (8 * q);
          if constexpr (kShuffle) {
            weights[8 * i + 2 * q] = __shfl_sync(0xffffffffu, lane_code_value, static_cast<int>(high));
            weights[8 * i + 2 * q + 1] = __shfl_sync(0xffffffffu, lane_code_value, static_cast<int>(low));
          } else {
            weights[8 * i + 2 * q] = table[high & 15];
            weights[8 * i + 2 * q + 1] = table[low & 15];
          }
        }
      accumulate_chunk<T, M>(weights, x, w.K, c, scale[r], &acc[0][r], kSplitRows, valid);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r) {
      float v = acc[m][r];
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][m][r] = v;
    }
  __syncthreads();
  if (threadIdx.x >= M * kSplitRows) return;
  const int m = threadIdx.x / kSplitRows, r = threadIdx.x % kSplitRows;
  const int64_t n = n0 + r;
  if (n >= w.N) return;
  float v = 0.f;
#pragma unroll
  for (int i = 0; i < kSplitWarps; ++i) v += partial[i][m][r];
  out[m * w.N + n] = static_cast<T>(bias ? v + static_cast<float>(bias[n]) : v);
}

// Which GEMV runs (LOWBIT_GEMV, read at each call so one process can time them all): "v1", the first design;
// "lds", the split GEMV decoding through shared memory; anything else, the split GEMV decoding by shuffles.
enum class Gemv { v1, split_lds, split_shuffle };

Gemv gemv_design() {
  const char* choice = std::getenv("LOWBIT_GEMV");
  if (choice != nullptr && std::strcmp(choice, "v1") == 0) return Gemv::v1;
  if (choice != nullptr && std::strcmp(choice, "lds") == 0) return Gemv::split_lds;
  return Gemv::split_shuffle;
}

template <typename T, bool kShuffle>
void launch_split_gemv(const Weight4& w, const T* x, const T* bias, T* out, int64_t M) {
  const dim3 grid(cuda::grid_size(cuda::ceil_div(w.N, kSplitRows), "lowbit.linear_4bit")), block(kSplitWarps * 32);
  const cuda::Shifts shift = cuda::shifts_of(w);
  const cudaStream_t stream = cuda::current_stream();
  cuda::with_row_count(M, [&](auto rows) {
    gemv_4bit_split_kernel<T, decltype(rows)::value, kShuffle><<<grid, block, 0, stream>>>(w, shift, x, bias, out);
  });
}

template <typename T>
void launch_gemv(const Weight4& w, const T* x, const T* bias, T* out, int64_t M) {
  const Gemv design = gemv_design();
  if (design == Gemv::split_shuffle) {
    launch_split_gemv<T, true>(w, x, bias, out, M);
  } else if (design == Gemv::split_lds) {
    launch_split_gemv<T, false>(w, x, bias, out, M);
  } else {
    const dim3 grid(cuda::grid_size(cuda::ceil_div(w.N, kGemvWarps), "lowbit.linear_4bit")), block(kGemvWarps * 32);
    const cudaStream_t stream = cuda::current_stream();
    cuda::with_row_count(M, [&](auto rows) {
      gemv_4bit_kernel<T, decltype(rows)::value><<<grid, block, 0, stream>>>(w, x, bias, out);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            int64_t blocksize, c10::string_view quant_type, at::IntArrayRef weight_shape,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset,
                            int64_t nested_blocksize) {
  const Weight4Tensors weight = validated_weight4(x, packed, absmax, blocksize, quant_type, weight_shape, bias,
                                                  nested_absmax, nested_code, nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.view.N, K = weight.view.K;
  const int64_t M = row_count(x);
  const std::vector<int64_t> out_shape = linear_output_shape(x, N);
  at::Tensor x2 = flatten_rows(x).contiguous();
  // The bias in x's dtype, as the reference adds it.
  const std::optional<at::Tensor> bias_x = bias ? std::optional(bias->to(x.scalar_type()).contiguous()) : std::nullopt;
  at::Tensor out;
  const bool gemv_shape = M >= 1 && M <= kMaxGemvRows && N > 0 && K > 0 && K % kChunk == 0;
  // A misaligned x (a few rows): copying it beats the slow path.
  if (gemv_shape && !cuda::aligned16(x2.const_data_ptr())) x2 = x2.clone();
  if (gemv_shape && !cuda::aligned16(weight.view.packed))
    TORCH_WARN_ONCE("lowbit.linear_4bit: the packed weight is not 16-byte aligned (a view into a larger buffer?), so ",
                    "decode dequantizes it for cuBLAS at every call instead of streaming it through the GEMV, several ",
                    "times slower: keep each weight in a tensor of its own (.clone() it once)");
  const bool gemv = gemv_shape && cuda::aligned16(weight.view.packed);
  LOWBIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "linear_4bit_cuda", [&] {
    if (gemv) {
      out = at::empty({M, N}, x2.options());
      launch_gemv(weight.view, x2.const_data_ptr<scalar_t>(),
                  bias_x ? bias_x->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M);
      return;
    }
    at::Tensor W = at::empty({N, K}, x2.options());
    cuda::dequantize_4bit(weight.view, N * K, W.data_ptr<scalar_t>(), "lowbit.linear_4bit");
    out = at::linear(x2, W, bias_x);
  });
  return out.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("linear_4bit", &linear_4bit_cuda); }

}  // namespace lowbit

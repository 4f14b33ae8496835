// Dequantizing a 4-bit weight on CUDA, shared by the dequantize_4bit op and by linear_4bit beyond the GEMV's
// rows (the weight dequantized into x's dtype for cuBLAS: every prefill and every QLoRA backward pass).
// Why it is built so:
//  * 16 elements a thread: one 8-byte load of packed codes, one block scale (a 16-element group never spans a
//    block: blocksizes are powers of two >= 32), 16 products, and 16-byte stores (two for bfloat16/half, four for
//    float). The first kernel stored two 2-byte elements a thread and divided a 64-bit index for each pair.
//  * The codebook in shared memory: a by-value kernel parameter indexed by data compiles to indexed constant-bank
//    loads, which serialize when a warp's lanes read different entries; 16 floats in 16 banks never conflict.
//  * Block indices are shifts (validate.h accepts power-of-two blocksizes only).
// Values are the CPU kernels' to the bit: table[code] * scale rounded once (formats.h mul_rn), and a
// double-quantized scale is nested_scale's multiply-then-add.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/launch.cuh"
#include "formats.h"

namespace lowbit::cuda {

struct Shifts {
  int block, nested_block;  // log2 of the blocksize and of the nested blocksize
};

inline Shifts shifts_of(const Weight4& w) {
  const auto log2 = [](int64_t v) { return __builtin_ctzll(static_cast<uint64_t>(v)); };
  return {log2(w.blocksize), w.absmax ? 0 : log2(w.nested_blocksize)};
}

// Copies the codebook (and the nested code of a double-quantized weight) into the CTA's shared memory.
__device__ inline void load_tables(const Weight4& w, float* table, float* nested_code) {
  if (threadIdx.x < 16) table[threadIdx.x] = w.table[threadIdx.x];
  if (!w.absmax)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = w.nested_code[i];
  __syncthreads();
}

__device__ inline float block_scale(const Weight4& w, const float* nested_code, Shifts shift, int64_t block) {
  if (w.absmax) return w.absmax[block];
  return add_rn(mul_rn(nested_code[w.absmax_q[block]], w.nested_absmax[block >> shift.nested_block]), w.nested_offset);
}

constexpr int kDequantizeThreads = 256;
constexpr int kDequantizeGroup = 16;  // elements a thread

// The first n elements of the weight, in flat order (blocks may span rows, rows may start mid-byte).
template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads)
    dequantize_4bit_kernel(Weight4 w, Shifts shift, int64_t n, T* __restrict__ out) {
  __shared__ float table[16];
  __shared__ float nested_code[256];
  load_tables(w, table, nested_code);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kDequantizeGroup;
  if (first >= n) return;
  const float scale = block_scale(w, nested_code, shift, first >> shift.block);
  const uint8_t* codes = w.packed + first / 2;
  if (first + kDequantizeGroup <= n && reinterpret_cast<uintptr_t>(codes) % 8 == 0) {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(codes));  // read once: do not keep it in L1
    uint8_t bytes[8];
    memcpy(bytes, &raw, sizeof(bytes));
    T values[kDequantizeGroup];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      values[2 * j] = static_cast<T>(mul_rn(table[bytes[j] >> 4], scale));
      values[2 * j + 1] = static_cast<T>(mul_rn(table[bytes[j] & 15], scale));
    }
    // out is a fresh allocation and first a multiple of 16: every 16-byte store is aligned.
    uint4 stores[sizeof(values) / 16];
    memcpy(stores, values, sizeof(values));
#pragma unroll
    for (int s = 0; s < static_cast<int>(sizeof(values) / 16); ++s)
      reinterpret_cast<uint4*>(out + first)[s] = stores[s];
    return;
  }
  // The last, partial group, or codes not 8-byte aligned (a view into a larger buffer).
  for (int64_t i = first; i < n && i < first + kDequantizeGroup; ++i)
    out[i] = static_cast<T>(mul_rn(table[code_at(w.packed, i)], scale));
}

// Dequantizes w's first n elements into out (n of them, freshly allocated) on the current stream.
template <typename T>
void dequantize_4bit(const Weight4& w, int64_t n, T* out, const char* op) {
  if (n == 0) return;
  const int64_t threads = ceil_div(n, kDequantizeGroup);
  dequantize_4bit_kernel<T><<<grid_size(ceil_div(threads, kDequantizeThreads), op), kDequantizeThreads, 0,
                              current_stream()>>>(w, shifts_of(w), n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lowbit::cuda

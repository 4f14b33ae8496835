// The 4-bit formats, in a form every device's kernels can include: constants, the code tables,
// the quantization codebooks, nibble packing and the decode of (double-quantized) block scales.
//
// The numbers are bitsandbytes' formats, so checkpoints interoperate byte for byte:
//  * NF4: the 16 quantiles of N(0,1) normalised to [-1, 1] (QLoRA), ascending.
//  * FP4: 1 sign bit (bit 3) + 3 magnitude bits; magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12.
//  * Two 4-bit codes per byte, the element with the even flat index in the HIGH nibble.
//  * Double quantization: scale[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset.
// The 8-bit code of double quantization (the signed dynamic map) reaches every kernel as a tensor
// argument; its values are defined once, in python/lowbit/formats.py.
//
// Device rules for this header: no ATen, no standard-library algorithms, no function-local statics.
// Everything a kernel calls is C10_HOST_DEVICE; tables are plain constexpr arrays or trivially
// copyable structs. constexpr variables of array or class type cannot be read from device code, so a
// CUDA kernel takes a Codebook4 or Weight4 by value (kernel parameters live in constant memory) or
// copies a table into __constant__ memory with cudaMemcpyToSymbol.
//
// Bit parity across devices: a value the format specifies (a scaled input, a dequantized weight, a
// block scale) is one IEEE float32 multiply, add or divide at a time, never fused. Host code is built
// with -ffp-contract=off; nvcc contracts a * b + c into an FMA by default, so the arithmetic below
// goes through mul_rn / add_rn / div_rn, which are the __f*_rn intrinsics on the device (nvcc never
// contracts those, and they ignore --use_fast_math). Accumulations whose order is not specified
// (the dot products of a linear) may use FMAs freely.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace lowbit {

inline constexpr int64_t kMinBlocksize = 32;
inline constexpr int64_t kMaxBlocksize = 4096;
// Smallest absmax the quantizers divide by; an all-zero block then quantizes to the zero code.
inline constexpr float kMinAbsmax = 1e-38f;

enum class QuantType : int { NF4 = 0, FP4 = 1 };

inline constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Divided in float32, exactly as the reference table is built.
inline constexpr float kFP4[16] = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,
    4.0f / 12.0f,  6.0f / 12.0f,     2.0f / 12.0f,  3.0f / 12.0f,
    -0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f};

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// A 4-bit code: its 16 values, and round-to-nearest with the tie rule of the reference quantizer:
// sort the table (stably), take the 15 midpoints, and pick the first sorted entry whose upper
// midpoint is >= x. For FP4 this sends +0 to code 0 and tiny positives to code 8 (-0), which is what
// bitsandbytes writes; matching it keeps packed bytes identical. Built at compile time (make_codebook).
struct Codebook4 {
  float value[16];  // value[code]
  float bounds[15];
  uint8_t code_of_sorted[16];
  uint8_t zero_code;

  // x is already scaled into [-1, 1]. A branch-free count keeps the loop vectorizable.
  constexpr C10_HOST_DEVICE int sorted_index(float x) const {
    int idx = 0;
    for (int i = 0; i < 15; ++i) idx += bounds[i] < x;
    return idx;
  }
  constexpr C10_HOST_DEVICE uint8_t encode(float x) const { return code_of_sorted[sorted_index(x)]; }
  constexpr C10_HOST_DEVICE float sorted_value(int idx) const { return value[code_of_sorted[idx]]; }
};

constexpr Codebook4 make_codebook(const float (&table)[16]) {
  Codebook4 book{};
  uint8_t order[16] = {};
  for (int i = 0; i < 16; ++i) {
    book.value[i] = table[i];
    order[i] = static_cast<uint8_t>(i);
  }
  for (int i = 1; i < 16; ++i) {  // insertion sort: stable, so equal values (+0, -0) keep code order
    const uint8_t code = order[i];
    int j = i;
    for (; j > 0 && table[order[j - 1]] > table[code]; --j) order[j] = order[j - 1];
    order[j] = code;
  }
  for (int i = 0; i < 15; ++i) book.bounds[i] = (table[order[i]] + table[order[i + 1]]) / 2.0f;
  for (int i = 0; i < 16; ++i) book.code_of_sorted[i] = order[i];
  book.zero_code = book.encode(0.0f);
  return book;
}

inline constexpr Codebook4 kNF4Codebook = make_codebook(kNF4);
inline constexpr Codebook4 kFP4Codebook = make_codebook(kFP4);

inline constexpr const Codebook4& codebook(QuantType t) { return t == QuantType::NF4 ? kNF4Codebook : kFP4Codebook; }

// Code of flat element idx in a packed buffer.
C10_HOST_DEVICE inline uint8_t code_at(const uint8_t* packed, int64_t idx) {
  const uint8_t byte = packed[idx >> 1];
  return (idx & 1) ? (byte & 0xF) : (byte >> 4);
}

C10_HOST_DEVICE inline uint8_t pack_codes(uint8_t even, uint8_t odd) { return static_cast<uint8_t>(even << 4 | odd); }

// Block b's scale of a double-quantized weight (the one place this formula is written in C++).
C10_HOST_DEVICE inline float nested_scale(const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                                          float offset, int64_t nested_blocksize, int64_t block) {
  return add_rn(mul_rn(nested_code[absmax_q[block]], nested_absmax[block / nested_blocksize]), offset);
}

// A read-only view of one packed [N, K] weight and its block scales: plain pointers into tensors
// on the kernel's device, so it is passed to a CUDA kernel by value.
struct Weight4 {
  const uint8_t* packed;
  int64_t N, K, blocksize;
  float table[16];
  const float* absmax;  // float32 scales, or null when double-quantized
  const uint8_t* absmax_q;  // double-quantized scale codes
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  int64_t nested_blocksize;

  C10_HOST_DEVICE float scale(int64_t block) const {
    if (absmax) return absmax[block];
    return nested_scale(absmax_q, nested_absmax, nested_code, nested_offset, nested_blocksize, block);
  }

  // Flat element idx of the weight, given its block's scale.
  C10_HOST_DEVICE float value(int64_t idx, float block_scale) const {
    return mul_rn(table[code_at(packed, idx)], block_scale);
  }
};

}  // namespace lowbit

// Code tables and block constants shared by every lowbit kernel (CPU and CUDA).
//
// The numbers are bitsandbytes' formats, so checkpoints interoperate byte for byte:
//  * NF4: the 16 quantiles of N(0,1) normalised to [-1, 1] (QLoRA), ascending.
//  * FP4: 1 sign bit (bit 3) + 3 magnitude bits; magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12.
//  * Two 4-bit codes per byte, the element with the even flat index in the HIGH nibble.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string_view>

#include <c10/util/Exception.h>

namespace lowbit {

constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;
// Block size of the second-level (double) quantization of the absmax values.
constexpr int64_t kNestedBlocksize = 256;
// Smallest absmax the quantizers divide by; an all-zero block then quantizes to the zero code.
constexpr float kMinAbsmax = 1e-38f;

enum class QuantType : int { NF4 = 0, FP4 = 1 };

alignas(64) constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Divided in float32, exactly as the reference table is built.
alignas(64) constexpr float kFP4[16] = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,
    4.0f / 12.0f,  6.0f / 12.0f,     2.0f / 12.0f,  3.0f / 12.0f,
    -0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f};

inline bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline void check_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK_VALUE(is_power_of_two(blocksize) && blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize,
                    op, ": blocksize must be a power of two in [", kMinBlocksize, ", ", kMaxBlocksize,
                    "], got ", blocksize);
}

inline QuantType parse_quant_type(std::string_view name, const char* op) {
  if (name == "nf4") return QuantType::NF4;
  if (name == "fp4") return QuantType::FP4;
  TORCH_CHECK_VALUE(false, op, ": quant_type must be 'nf4' or 'fp4', got '", std::string(name), "'");
}

inline const float* code_table(QuantType t) { return t == QuantType::NF4 ? kNF4 : kFP4; }

// Round-to-nearest against a 16-entry table, with the tie rule of the reference quantizer:
// sort the table (stably), take the 15 midpoints, and pick the first sorted entry whose
// upper midpoint is >= x. For FP4 this sends +0 to code 0 and tiny positives to code 8 (-0),
// which is what bitsandbytes writes; matching it keeps packed bytes identical.
struct Codebook4 {
  float bounds[15];
  uint8_t code_of_sorted[16];
  uint8_t zero_code;

  explicit Codebook4(QuantType t) {
    const float* table = code_table(t);
    std::array<uint8_t, 16> order;
    for (int i = 0; i < 16; ++i) order[i] = static_cast<uint8_t>(i);
    std::stable_sort(order.begin(), order.end(), [&](uint8_t a, uint8_t b) { return table[a] < table[b]; });
    for (int i = 0; i < 15; ++i) bounds[i] = (table[order[i]] + table[order[i + 1]]) / 2.0f;
    for (int i = 0; i < 16; ++i) code_of_sorted[i] = order[i];
    zero_code = encode(0.0f);
  }

  // x is already scaled into [-1, 1]. A branch-free count keeps the loop vectorizable.
  inline uint8_t encode(float x) const {
    int idx = 0;
    for (int i = 0; i < 15; ++i) idx += bounds[i] < x;
    return code_of_sorted[idx];
  }
};

inline const Codebook4& codebook(QuantType t) {
  static const Codebook4 nf4(QuantType::NF4);
  static const Codebook4 fp4(QuantType::FP4);
  return t == QuantType::NF4 ? nf4 : fp4;
}

}  // namespace lowbit

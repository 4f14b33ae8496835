// What the LLM.int8() CUDA files share: the activation quantization (int8_vectorwise_quant.cu), the exact
// int8 matmul (int8_mm.cu), both called by int8_linear.cu, and the device arithmetic of the rescale, so the
// decode GEMV and the large-M epilogue compute the same float32 operations as the CPU kernel
// (csrc/cpu/int8.cpp), in the same order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "formats.h"

namespace lowbit::cuda {

// x's rows quantized as int8_vectorwise_quant defines them, left on the device (no host synchronisation).
struct Int8Activations {
  at::Tensor codes;      // int8 [M, K]; outlier columns and poisoned (NaN/Inf) rows are 0
  at::Tensor row_stats;  // float32 [M]: absmax over the row's non-outlier elements; NaN for a poisoned row
  // With threshold > 0 only (otherwise undefined tensors):
  at::Tensor column_flags;  // uint8 [K]: 1 where the column holds an element with |x| >= threshold
  // With threshold > 0 and list_outliers only:
  at::Tensor outlier_columns;  // int32 [K]: the flagged columns in ascending order, then unwritten entries
  at::Tensor outlier_count;    // int32 [1]: how many entries of outlier_columns are written
};

// x2: float32/float16/bfloat16 [M, K], contiguous, on the current device. With list_outliers (and
// threshold > 0) the flagged columns are also compacted into outlier_columns/outlier_count. The list
// holds K entries, so it cannot overflow: an input whose every column is an outlier is still exact.
Int8Activations quantize_activations(const at::Tensor& x2, double threshold, bool list_outliers);

// Exact int8 [M, K] x int8 [N, K] -> int32 [M, N] (A @ B.T), both contiguous, on the current stream.
at::Tensor int8_matmul(const at::Tensor& A, const at::Tensor& B);

// The outlier columns of a linear call as kernels see them: none when count is null (threshold 0).
struct OutlierColumns {
  const int32_t* columns;
  const int32_t* count;
  __device__ int size() const { return count ? *count : 0; }
};

// One output of LLM.int8(), operation for operation as the CPU kernel computes it:
// (acc * row_stat) * (weight_scale / 127^2), plus the outlier columns' float product, plus bias (the 1 / 127^2 with
// the weight's scale: a subnormal row_stat scaled down further would lose its bits).
// A poisoned row (row_stat NaN) gives NaN, as F.linear would.
__device__ inline float int8_output(int32_t acc, float row_stat, float weight_scale, float outlier_sum,
                                    float bias) {
  const float scaled = mul_rn(mul_rn(static_cast<float>(acc), row_stat), div_rn(weight_scale, 127.0f * 127.0f));
  return add_rn(add_rn(scaled, outlier_sum), bias);
}

// The dequantized weight at an outlier column: CB * (SCB / 127) in float32, as the CPU and reference build it.
__device__ inline float outlier_weight(int8_t code, float weight_scale) {
  return mul_rn(static_cast<float>(code), div_rn(weight_scale, 127.0f));
}

}  // namespace lowbit::cuda

// The argument checks the per-op validators (validate.h) are made of. Each raises a Python
// ValueError/TypeError naming the op and the argument, so a bad call through torch.ops.lowbit.* is
// stopped, on any device, before a kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>

#include "formats.h"

namespace lowbit {

inline void check_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK_VALUE(blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize && (blocksize & (blocksize - 1)) == 0,
                    op, ": blocksize must be a power of two in [", kMinBlocksize, ", ", kMaxBlocksize, "], got ",
                    blocksize);
}

inline QuantType parse_quant_type(std::string_view name, const char* op) {
  if (name == "nf4") return QuantType::NF4;
  if (name == "fp4") return QuantType::FP4;
  TORCH_CHECK_VALUE(false, op, ": quant_type must be 'nf4' or 'fp4', got '", std::string(name), "'");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but the input is on ",
                    a.device());
}

inline void check_numel(const at::Tensor& t, int64_t expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == expected, op, ": ", name, " has ", t.numel(), " elements, expected ", expected,
                    " (does it belong to this weight?)");
}

inline void check_out_dtype(at::ScalarType dtype, const char* op) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": output dtype must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_threshold(double threshold, const char* op) {
  TORCH_CHECK_VALUE(threshold >= 0 && std::isfinite(threshold), op,
                    ": threshold must be finite and >= 0, got ", threshold);
}

inline void check_at_least_1d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
}

// The bias of a linear op: float, on x's device, [out_features].
inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out_features,
                       const char* op) {
  if (!bias.has_value()) return;
  check_float(*bias, op, "bias");
  check_same_device(x, *bias, op, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape [", out_features,
                    "], got ", bias->sizes());
}

// Kernels find non-finite inputs while they scan them; every device reports them the same way.
inline void check_finite_input(bool finite, const char* op) {
  TORCH_CHECK_VALUE(finite, op, ": input contains NaN or Inf; a block's absmax would be meaningless");
}

}  // namespace lowbit

// The argument checks the per-op validators (validate.h) are made of. Each raises a Python
// ValueError/TypeError naming the op and the argument, so a bad call through torch.ops.lowbit.* is
// stopped, on any device, before a kernel runs. Sizes are read as SymInts: the same checks run in the
// Meta kernels, where torch.compile may trace with symbolic sizes (a check on a symbolic size becomes a
// runtime assertion of the compiled graph instead of a guard).
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

// A ValueError unless `cond` (a SymBool over sizes) holds.
#define LOWBIT_CHECK_SIZES(cond, ...) TORCH_CHECK_VALUE((cond).expect_true(__FILE__, __LINE__), __VA_ARGS__)

// Blocks of `blocksize` elements covering n elements (the last one may be partial).
inline c10::SymInt n_blocks(const c10::SymInt& n, int64_t blocksize) { return (n + (blocksize - 1)) / blocksize; }

inline void check_numel(const at::Tensor& t, const c10::SymInt& expected, const char* op, const char* name) {
  LOWBIT_CHECK_SIZES(t.sym_numel().sym_eq(expected), op, ": ", name, " has ", t.sym_numel(), " elements, expected ",
                     expected, " (does it belong to this weight?)");
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
inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, const c10::SymInt& out_features,
                       const char* op) {
  if (!bias.has_value()) return;
  check_float(*bias, op, "bias");
  check_same_device(x, *bias, op, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1, op, ": bias must have shape [", out_features, "], got ", bias->sym_sizes());
  LOWBIT_CHECK_SIZES(bias->sym_size(0).sym_eq(out_features), op, ": bias must have shape [", out_features, "], got ",
                     bias->sym_sizes());
}

// Kernels find non-finite inputs while they scan them; every device reports them the same way.
inline void check_finite_input(bool finite, const char* op) {
  TORCH_CHECK_VALUE(finite, op, ": input contains NaN or Inf; a block's absmax would be meaningless");
}

}  // namespace lowbit

// Argument checks shared by every device's native kernels. They raise Python ValueError/TypeError
// with the op's name, so a bad call through torch.ops.lowbit.* is stopped before the kernel runs.
#pragma once

#include <ATen/ATen.h>

namespace lowbit {

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

}  // namespace lowbit

// One argument validator per op, called first by that op's kernel on every device, so a CUDA
// kernel rejects exactly what the CPU kernel rejects, with the same messages. Each takes the op's
// schema arguments and returns what the kernels need from the checks (parsed options, the view of a
// packed weight). Only checks of the data itself (NaN/Inf found while scanning an input) are left to
// the kernels, which report them through check_finite_input.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "formats.h"

namespace lowbit {

QuantType validate_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type);

QuantType validate_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                   std::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype);

void validate_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize);

void validate_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype);

// linear_4bit's weight, checked against x: contiguous copies of the weight's tensors and a Weight4
// view into them (valid while this object lives), plus M = the number of rows of x.
struct Linear4bitWeight {
  at::Tensor packed, absmax, nested_absmax, nested_code;
  Weight4 view;
  int64_t M;
};

Linear4bitWeight validate_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t blocksize, std::string_view quant_type, int64_t out_features,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code, double nested_offset,
                                      int64_t nested_blocksize);

void validate_int8_vectorwise_quant(const at::Tensor& A, double threshold);

void validate_int8_mm(const at::Tensor& A, const at::Tensor& B);

void validate_int8_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                          const std::optional<at::Tensor>& bias);

}  // namespace lowbit

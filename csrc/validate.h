// One argument validator per op, called first by that op's kernel on every device (csrc/cpu,
// csrc/cuda) and by its Meta kernel (csrc/meta.cpp, what meta tensors and torch.compile run): a bad
// call raises the same exception with the same message wherever it is made. Only checks of the data
// itself (NaN/Inf found while scanning an input) are left to the kernels, which report them through
// check_finite_input. Sizes are SymInts so the Meta kernels can validate symbolic shapes too.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "formats.h"

namespace lowbit {

QuantType validate_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type);

// ratios: 1 to kMaxSearchRatios scale ratios in (0, kMaxSearchRatio]; importance: float32 [A.size(-1)].
QuantType validate_quantize_4bit_search(const at::Tensor& A, int64_t blocksize, std::string_view quant_type,
                                        at::ArrayRef<double> ratios, const std::optional<at::Tensor>& importance);

QuantType validate_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                   std::string_view quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype);

// The code's values are checked (sorted ascending) except on meta tensors, which have none.
void validate_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize);

void validate_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype);

// weight_shape is the weight's [out_features, in_features]: x's last dimension must be in_features
// (the packed size alone cannot tell K from K + 1 in every shape).
QuantType validate_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, std::string_view quant_type, c10::SymIntArrayRef weight_shape,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset,
                               int64_t nested_blocksize);

void validate_int8_vectorwise_quant(const at::Tensor& A, double threshold);

void validate_int8_mm(const at::Tensor& A, const at::Tensor& B);

void validate_int8_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                          const std::optional<at::Tensor>& bias);

void validate_int8_weight_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                 const std::optional<at::Tensor>& bias);

}  // namespace lowbit

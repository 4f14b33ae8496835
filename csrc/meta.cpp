// Meta kernels: what an op computes on meta tensors, and under torch.compile's fake tensors. Each
// runs the op's validator (validate.h), the same as every device's kernel, so meta and compiled calls
// reject exactly what eager calls reject, then returns empty outputs of the right shape and dtype.
// int8_vectorwise_quant has no kernel here: its number of outlier columns depends on the data, which
// only a Python fake kernel can express (an unbacked size); see python/lowbit/ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "validate.h"

namespace lowbit {
namespace {

std::vector<c10::SymInt> with_last(c10::SymIntArrayRef sizes, const c10::SymInt& last) {
  std::vector<c10::SymInt> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// What both 4-bit quantizers return for A: packed codes [(numel + 1) / 2, 1] and one scale per block.
std::tuple<at::Tensor, at::Tensor> packed_4bit_like(const at::Tensor& A, int64_t blocksize) {
  const c10::SymInt n = A.sym_numel();
  return {at::empty_symint({(n + 1) / 2, 1}, A.options().dtype(at::kByte)),
          at::empty_symint({n_blocks(n, blocksize)}, A.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_meta(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  validate_quantize_4bit(A, blocksize, quant_type);
  return packed_4bit_like(A, blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_search_meta(const at::Tensor& A, int64_t blocksize,
                                                             c10::string_view quant_type, at::ArrayRef<double> ratios,
                                                             const std::optional<at::Tensor>& importance) {
  validate_quantize_4bit_search(A, blocksize, quant_type, ratios, importance);
  return packed_4bit_like(A, blocksize);
}

at::Tensor dequantize_4bit_meta(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype) {
  validate_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype);
  return at::empty_symint(shape, packed.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_meta(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize) {
  validate_quantize_blockwise(A, code, blocksize);
  return {at::empty_symint(A.sym_sizes(), A.options().dtype(at::kByte)),
          at::empty_symint({n_blocks(A.sym_numel(), blocksize)}, A.options().dtype(at::kFloat))};
}

at::Tensor dequantize_blockwise_meta(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  validate_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  return at::empty_symint(A.sym_sizes(), A.options().dtype(dtype));
}

at::Tensor linear_4bit_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            int64_t blocksize, c10::string_view quant_type, c10::SymIntArrayRef weight_shape,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset,
                            int64_t nested_blocksize) {
  validate_linear_4bit(x, packed, absmax, blocksize, quant_type, weight_shape, bias, nested_absmax, nested_code,
                       nested_offset, nested_blocksize);
  return at::empty_symint(with_last(x.sym_sizes(), weight_shape[0]), x.options());
}

at::Tensor int8_mm_meta(const at::Tensor& A, const at::Tensor& B) {
  validate_int8_mm(A, B);
  return at::empty_symint({A.sym_size(0), B.sym_size(0)}, A.options().dtype(at::kInt));
}

at::Tensor int8_linear_meta(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                            const std::optional<at::Tensor>& bias) {
  validate_int8_linear(x, CB, SCB, threshold, bias);
  return at::empty_symint(with_last(x.sym_sizes(), CB.sym_size(0)), x.options());
}

at::Tensor int8_weight_linear_meta(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                   const std::optional<at::Tensor>& bias) {
  validate_int8_weight_linear(x, CB, SCB, bias);
  return at::empty_symint(with_last(x.sym_sizes(), CB.sym_size(0)), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("quantize_4bit", &quantize_4bit_meta);
  m.impl("quantize_4bit_search", &quantize_4bit_search_meta);
  m.impl("dequantize_4bit", &dequantize_4bit_meta);
  m.impl("quantize_blockwise", &quantize_blockwise_meta);
  m.impl("dequantize_blockwise", &dequantize_blockwise_meta);
  m.impl("linear_4bit", &linear_4bit_meta);
  m.impl("int8_mm", &int8_mm_meta);
  m.impl("int8_linear", &int8_linear_meta);
  m.impl("int8_weight_linear", &int8_weight_linear_meta);
}

}  // namespace lowbit

// The per-op validators declared in validate.h. Device-independent: they read shapes, dtypes and
// devices, and use ATen ops (which run on the tensors' device) where a check must read values.
#include "validate.h"

#include <ATen/ATen.h>

#include <limits>

#include "checks.h"

namespace lowbit {
namespace {

// int32 accumulators hold K products of magnitude up to 127 * 127 = 16129.
constexpr int64_t kMaxInt8K = std::numeric_limits<int32_t>::max() / (127 * 127);

void check_code_256(const at::Tensor& code, const at::Tensor& A, const char* op) {
  check_dtype(code, at::kFloat, op, "code");
  check_same_device(A, code, op, "code");
  check_numel(code, 256, op, "code");
}

int64_t numel_of(at::IntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": negative size in shape ", shape);
    n *= s;
  }
  return n;
}

int64_t blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

}  // namespace

QuantType validate_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type) {
  const char* op = "lowbit.quantize_4bit";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_float(A, op, "A");
  return type;
}

QuantType validate_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                   std::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "lowbit.dequantize_4bit";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_dtype(packed, at::kByte, op, "packed");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_same_device(packed, absmax, op, "absmax");
  check_out_dtype(dtype, op);
  const int64_t n = numel_of(shape, op);
  check_numel(packed, (n + 1) / 2, op, "packed");
  check_numel(absmax, blocks(n, blocksize), op, "absmax");
  return type;
}

void validate_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  const char* op = "lowbit.quantize_blockwise";
  check_blocksize(blocksize, op);
  check_float(A, op, "A");
  check_code_256(code, A, op);
  // The kernels binary-search the code. Reading 256 values costs a device sync on a GPU, which a
  // quantizer (run once per weight, never in a forward) can afford.
  const at::Tensor descending = at::nonzero(code.diff() < 0);
  TORCH_CHECK_VALUE(descending.numel() == 0, op, ": code must be sorted ascending (entry ",
                    descending.numel() ? descending[0][0].item<int64_t>() + 1 : 0, ")");
}

void validate_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype) {
  const char* op = "lowbit.dequantize_blockwise";
  check_blocksize(blocksize, op);
  check_dtype(A, at::kByte, op, "A");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_same_device(A, absmax, op, "absmax");
  check_code_256(code, A, op);
  check_out_dtype(dtype, op);
  check_numel(absmax, blocks(A.numel(), blocksize), op, "absmax");
}

Linear4bitWeight validate_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t blocksize, std::string_view quant_type, int64_t out_features,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code, double nested_offset,
                                      int64_t nested_blocksize) {
  const char* op = "lowbit.linear_4bit";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_float(x, op, "x");
  check_at_least_1d(x, op, "x");
  check_dtype(packed, at::kByte, op, "packed weight");
  check_same_device(x, packed, op, "packed weight");
  check_same_device(x, absmax, op, "absmax");
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be non-negative, got ", out_features);
  const int64_t K = x.size(-1);
  const int64_t N = out_features;
  const int64_t n = N * K;
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": the packed weight holds ", packed.numel(),
                    " bytes but a [", N, ", ", K, "] weight needs ", (n + 1) / 2,
                    " (does x's last dimension match in_features?)");
  const int64_t nblocks = blocks(n, blocksize);
  check_numel(absmax, nblocks, op, "absmax");
  check_bias(bias, x, N, op);

  Linear4bitWeight w{packed.contiguous(), absmax.contiguous(), {}, {}, {}, 0};
  w.M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  w.view.packed = w.packed.const_data_ptr<uint8_t>();
  w.view.N = N;
  w.view.K = K;
  w.view.blocksize = blocksize;
  for (int i = 0; i < 16; ++i) w.view.table[i] = codebook(type).value[i];
  if (w.absmax.scalar_type() == at::kFloat) {
    w.view.absmax = w.absmax.const_data_ptr<float>();
    return w;
  }
  TORCH_CHECK_TYPE(w.absmax.scalar_type() == at::kByte, op,
                   ": absmax must be float32, or uint8 when double-quantized, got ", w.absmax.scalar_type());
  TORCH_CHECK_VALUE(nested_absmax.has_value() && nested_code.has_value(), op,
                    ": a double-quantized (uint8) absmax needs nested_absmax and nested_code");
  check_blocksize(nested_blocksize, op);
  w.nested_absmax = nested_absmax->contiguous();
  w.nested_code = nested_code->contiguous();
  check_dtype(w.nested_absmax, at::kFloat, op, "nested_absmax");
  check_dtype(w.nested_code, at::kFloat, op, "nested_code");
  check_same_device(x, w.nested_absmax, op, "nested_absmax");
  check_same_device(x, w.nested_code, op, "nested_code");
  check_numel(w.nested_absmax, blocks(nblocks, nested_blocksize), op, "nested_absmax");
  check_numel(w.nested_code, 256, op, "nested_code");
  w.view.absmax_q = w.absmax.const_data_ptr<uint8_t>();
  w.view.nested_absmax = w.nested_absmax.const_data_ptr<float>();
  w.view.nested_code = w.nested_code.const_data_ptr<float>();
  w.view.nested_offset = static_cast<float>(nested_offset);
  w.view.nested_blocksize = nested_blocksize;
  return w;
}

void validate_int8_vectorwise_quant(const at::Tensor& A, double threshold) {
  const char* op = "lowbit.int8_vectorwise_quant";
  check_float(A, op, "A");
  check_at_least_1d(A, op, "A");
  check_threshold(threshold, op);
}

void validate_int8_mm(const at::Tensor& A, const at::Tensor& B) {
  const char* op = "lowbit.int8_mm";
  check_dtype(A, at::kChar, op, "A");
  check_dtype(B, at::kChar, op, "B");
  check_same_device(A, B, op, "B");
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2, op, ": A and B must be 2-D, got ", A.sizes(), " and ", B.sizes());
  TORCH_CHECK_VALUE(A.size(1) == B.size(1), op, ": A is ", A.sizes(), " and B is ", B.sizes(),
                    "; A @ B.T needs the same last dimension");
  TORCH_CHECK_VALUE(A.size(1) <= kMaxInt8K, op, ": K = ", A.size(1), " could overflow the int32 accumulator (max ",
                    kMaxInt8K, ")");
}

void validate_int8_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "lowbit.int8_linear";
  check_float(x, op, "x");
  check_at_least_1d(x, op, "x");
  check_dtype(CB, at::kChar, op, "weight (CB)");
  check_dtype(SCB, at::kFloat, op, "SCB");
  check_same_device(x, CB, op, "weight (CB)");
  check_same_device(x, SCB, op, "SCB");
  TORCH_CHECK_VALUE(CB.dim() == 2, op, ": weight (CB) must be 2-D [out_features, in_features], got ", CB.sizes());
  const int64_t N = CB.size(0), K = CB.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, op, ": x has ", x.size(-1), " features but the weight expects ", K);
  TORCH_CHECK_VALUE(K <= kMaxInt8K, op, ": in_features = ", K, " could overflow the int32 accumulator (max ",
                    kMaxInt8K, ")");
  check_numel(SCB, N, op, "SCB");
  check_threshold(threshold, op);
  check_bias(bias, x, N, op);
}

}  // namespace lowbit

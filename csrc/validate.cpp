// The per-op validators declared in validate.h. Device-independent: they read shapes, dtypes and
// devices, and use ATen ops (which run on the tensors' device) where a check must read values.
#include "validate.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <cfloat>
#include <cmath>
#include <limits>

#include "checks.h"

namespace lowbit {
namespace {

// int32 accumulators hold K products of two int8 values, each at most (-128)^2 = 16384 in magnitude:
// K <= 131071 cannot overflow, whatever int8 values a checkpoint or a caller brings.
constexpr int64_t kMaxInt8K = std::numeric_limits<int32_t>::max() / (128 * 128);

void check_code_256(const at::Tensor& code, const at::Tensor& A, const char* op) {
  check_dtype(code, at::kFloat, op, "code");
  check_same_device(A, code, op, "code");
  check_numel(code, 256, op, "code");
}

c10::SymInt numel_of(c10::SymIntArrayRef shape, const char* op) {
  c10::SymInt n = 1;
  for (const c10::SymInt& s : shape) {
    LOWBIT_CHECK_SIZES(s.sym_ge(0), op, ": negative size in shape ", shape);
    if (!n.is_symbolic() && !s.is_symbolic()) {  // a product that wraps around would pass the size checks
      int64_t product = 0;
      TORCH_CHECK_VALUE(!c10::mul_overflows(n.as_int_unchecked(), s.as_int_unchecked(), &product), op, ": shape ",
                        shape, " has more elements than an int64 counts");
    }
    n = n * s;
  }
  return n;
}

void check_k(const c10::SymInt& K, const char* op, const char* what) {
  LOWBIT_CHECK_SIZES(K.sym_le(kMaxInt8K), op, ": ", what, " = ", K,
                     " could overflow the int32 accumulator (max ", kMaxInt8K, ")");
}

}  // namespace

QuantType validate_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type) {
  const char* op = "lowbit.quantize_4bit";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_float(A, op, "A");
  return type;
}

QuantType validate_quantize_4bit_search(const at::Tensor& A, int64_t blocksize, std::string_view quant_type,
                                        at::ArrayRef<double> ratios, const std::optional<at::Tensor>& importance) {
  const char* op = "lowbit.quantize_4bit_search";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_float(A, op, "A");
  // Each ratio costs one encode of every block; a ratio beyond 4 leaves most of the codes unused.
  constexpr size_t kMaxSearchRatios = 64;
  constexpr double kMaxSearchRatio = 4.0;
  TORCH_CHECK_VALUE(!ratios.empty() && ratios.size() <= kMaxSearchRatios, op, ": ratios must have 1 to ",
                    kMaxSearchRatios, " entries, got ", ratios.size());
  for (const double r : ratios) {
    TORCH_CHECK_VALUE(r > 0 && r <= kMaxSearchRatio, op, ": every ratio must be in (0, ", kMaxSearchRatio, "], got ", r);
  }
  if (importance.has_value()) {
    check_dtype(*importance, at::kFloat, op, "importance");
    check_same_device(A, *importance, op, "importance");
    check_at_least_1d(A, op, "A (when importance is given)");
    TORCH_CHECK_VALUE(importance->dim() == 1, op, ": importance must be 1-D [A.size(-1)], got shape ",
                      importance->sym_sizes());
    LOWBIT_CHECK_SIZES(importance->sym_size(0).sym_eq(A.sym_size(-1)), op, ": importance has ",
                       importance->sym_size(0), " entries but A's last dimension is ", A.sym_size(-1));
  }
  return type;
}

QuantType validate_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                   std::string_view quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const char* op = "lowbit.dequantize_4bit";
  check_blocksize(blocksize, op);
  const QuantType type = parse_quant_type(quant_type, op);
  check_dtype(packed, at::kByte, op, "packed");
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_same_device(packed, absmax, op, "absmax");
  check_out_dtype(dtype, op);
  const c10::SymInt n = numel_of(shape, op);
  check_numel(packed, (n + 1) / 2, op, "packed");
  check_numel(absmax, n_blocks(n, blocksize), op, "absmax");
  return type;
}

void validate_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  const char* op = "lowbit.quantize_blockwise";
  check_blocksize(blocksize, op);
  check_float(A, op, "A");
  check_code_256(code, A, op);
  if (code.is_meta()) return;
  // The kernels binary-search the code. Reading 256 values costs a device sync on a GPU, which a
  // quantizer (run once per weight, never in a forward) can afford.
  const at::Tensor descending = at::nonzero(~(code.diff() >= 0));  // NaN entries fail too
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
  check_numel(absmax, n_blocks(A.sym_numel(), blocksize), op, "absmax");
}

QuantType validate_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, std::string_view quant_type, c10::SymIntArrayRef weight_shape,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
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
  TORCH_CHECK_VALUE(weight_shape.size() == 2, op, ": weight_shape must be [out_features, in_features], got ",
                    weight_shape);
  const c10::SymInt& N = weight_shape[0];
  const c10::SymInt& K = weight_shape[1];
  const c10::SymInt n = numel_of(weight_shape, op);
  LOWBIT_CHECK_SIZES(x.sym_size(-1).sym_eq(K), op, ": x has ", x.sym_size(-1), " features but the weight is [", N,
                     ", ", K, "]");
  LOWBIT_CHECK_SIZES(packed.sym_numel().sym_eq((n + 1) / 2), op, ": the packed weight holds ", packed.sym_numel(),
                     " bytes but a [", N, ", ", K, "] weight needs ", (n + 1) / 2);
  const c10::SymInt nblocks = n_blocks(n, blocksize);
  check_numel(absmax, nblocks, op, "absmax");
  check_bias(bias, x, N, op);

  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK_VALUE(!nested_absmax.has_value() && !nested_code.has_value(), op,
                      ": nested_absmax/nested_code were given with a float32 absmax; double-quantized scales are "
                      "uint8 codes (a float32 absmax with nested tensors is a corrupt or mismatched weight)");
    return type;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                   ": absmax must be float32, or uint8 when double-quantized, got ", absmax.scalar_type());
  TORCH_CHECK_VALUE(nested_absmax.has_value() && nested_code.has_value(), op,
                    ": a double-quantized (uint8) absmax needs nested_absmax and nested_code");
  check_blocksize(nested_blocksize, op);
  check_dtype(*nested_absmax, at::kFloat, op, "nested_absmax");
  check_dtype(*nested_code, at::kFloat, op, "nested_code");
  check_same_device(x, *nested_absmax, op, "nested_absmax");
  check_same_device(x, *nested_code, op, "nested_code");
  check_numel(*nested_absmax, n_blocks(nblocks, nested_blocksize), op, "nested_absmax");
  check_numel(*nested_code, 256, op, "nested_code");
  TORCH_CHECK_VALUE(std::isfinite(nested_offset) && std::abs(nested_offset) <= FLT_MAX, op,
                    ": nested_offset must be a finite float32, got ", nested_offset);
  return type;
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
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2, op, ": A and B must be 2-D, got ", A.sym_sizes(), " and ",
                    B.sym_sizes());
  LOWBIT_CHECK_SIZES(A.sym_size(1).sym_eq(B.sym_size(1)), op, ": A is ", A.sym_sizes(), " and B is ", B.sym_sizes(),
                     "; A @ B.T needs the same last dimension");
  check_k(A.sym_size(1), op, "K");
}

namespace {

// The int8 weight (CB) and row scales (SCB) of a linear op, against x.
void check_int8_weight(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                       const std::optional<at::Tensor>& bias, const char* op) {
  check_float(x, op, "x");
  check_at_least_1d(x, op, "x");
  check_dtype(CB, at::kChar, op, "weight (CB)");
  check_dtype(SCB, at::kFloat, op, "SCB");
  check_same_device(x, CB, op, "weight (CB)");
  check_same_device(x, SCB, op, "SCB");
  TORCH_CHECK_VALUE(CB.dim() == 2, op, ": weight (CB) must be 2-D [out_features, in_features], got ", CB.sym_sizes());
  LOWBIT_CHECK_SIZES(x.sym_size(-1).sym_eq(CB.sym_size(1)), op, ": x has ", x.sym_size(-1),
                     " features but the weight expects ", CB.sym_size(1));
  check_numel(SCB, CB.sym_size(0), op, "SCB");
  check_bias(bias, x, CB.sym_size(0), op);
}

}  // namespace

void validate_int8_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "lowbit.int8_linear";
  check_int8_weight(x, CB, SCB, bias, op);
  check_k(CB.sym_size(1), op, "in_features");
  check_threshold(threshold, op);
}

void validate_int8_weight_linear(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                 const std::optional<at::Tensor>& bias) {
  check_int8_weight(x, CB, SCB, bias, "lowbit.int8_weight_linear");
}

}  // namespace lowbit

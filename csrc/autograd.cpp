// Autograd for the linear ops: gradients flow to the input and the bias; the quantized weight is
// frozen (as in QLoRA), so backward is grad @ W with W dequantized on the fly.
//
// Why C++ and not torch.library.register_autograd in ops.py: the dispatcher runs the Autograd kernel
// on every call, grad mode or not, and a Python one costs ~6 us a call on a 2-core x86 VM. A decode
// step makes ~230 small linear calls, where that was 7% of the step; here the no-grad path is a
// guard and a redispatch. Every device's kernel (native, Meta, or the Python reference of
// lowbit.fallback) sits below this one.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

namespace lowbit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The op's kernel below autograd: the device's, Meta's or the fallback's.
template <typename Signature, typename... Args>
at::Tensor call_below_autograd(const c10::TypedOperatorHandle<Signature>& kernel, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return kernel.call(std::forward<Args>(args)...);
}

// d(x @ W.T + b)/dx = grad @ W; d/db sums grad over every leading dimension.
at::Tensor grad_input(const at::Tensor& grad, const at::Tensor& weight) { return at::matmul(grad, weight); }

// needs_input_grad counts tensor inputs only, and an absent optional is none: x, the two weight tensors
// and then the bias are edges 0-3 in every linear op here, so the bias is edge 3 when it was passed.
constexpr size_t kBiasEdge = 3;

bool bias_needs_grad(AutogradContext* ctx) {
  return ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(kBiasEdge);
}

at::Tensor grad_bias(const at::Tensor& grad) {
  std::vector<int64_t> leading(grad.dim() - 1);
  std::iota(leading.begin(), leading.end(), 0);
  return leading.empty() ? grad : grad.sum(leading);
}

using Linear4bitSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                       c10::string_view, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                       int64_t);

const c10::TypedOperatorHandle<Linear4bitSignature>& linear_4bit_op() {
  static const auto handle = op<Linear4bitSignature>("lowbit::linear_4bit");
  return handle;
}

class Linear4bit : public torch::autograd::Function<Linear4bit> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, int64_t blocksize, c10::string_view quant_type,
                            c10::SymIntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset,
                            int64_t nested_blocksize) {
    // Only tensors the backward reads are saved; double-quantized scales are decoded there, not kept.
    ctx->save_for_backward({packed, absmax, nested_absmax.value_or(at::Tensor()), nested_code.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = std::string(quant_type);
    ctx->saved_data["out_features"] = weight_shape[0];
    ctx->saved_data["in_features"] = weight_shape[1];
    ctx->saved_data["nested_offset"] = nested_offset;
    ctx->saved_data["nested_blocksize"] = nested_blocksize;
    return call_below_autograd(linear_4bit_op(), x, packed, absmax, blocksize, quant_type, weight_shape, bias,
                               nested_absmax, nested_code, nested_offset, nested_blocksize);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    variable_list out(11);
    if (ctx->needs_input_grad(0)) {
      static const auto dequantize_4bit =
          op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, c10::SymIntArrayRef,
                        at::ScalarType)>("lowbit::dequantize_4bit");
      static const auto dequantize_blockwise =
          op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::ScalarType)>(
              "lowbit::dequantize_blockwise");
      const auto saved = ctx->get_saved_variables();
      const at::Tensor &packed = saved[0], &absmax = saved[1], &nested_absmax = saved[2], &nested_code = saved[3];
      // A double-quantized scale is nested_code[code] * nested_absmax[block] + offset (the schema's formula).
      const at::Tensor scales =
          nested_absmax.defined()
              ? dequantize_blockwise.call(absmax, nested_absmax, nested_code,
                                          ctx->saved_data["nested_blocksize"].toInt(), at::kFloat) +
                    ctx->saved_data["nested_offset"].toDouble()
              : absmax;
      const c10::SymInt shape[] = {ctx->saved_data["out_features"].toSymInt(),
                                   ctx->saved_data["in_features"].toSymInt()};
      out[0] = grad_input(grad, dequantize_4bit.call(packed, scales, ctx->saved_data["blocksize"].toInt(),
                                                     ctx->saved_data["quant_type"].toStringRef(), shape,
                                                     grad.scalar_type()));
    }
    if (bias_needs_grad(ctx)) out[6] = grad_bias(grad);
    return out;
  }
};

at::Tensor linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, c10::string_view quant_type, c10::SymIntArrayRef weight_shape,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, double nested_offset,
                                int64_t nested_blocksize) {
  // Inference (no grad mode, or nothing that needs a gradient) skips the autograd node and its saved state.
  if (!torch::autograd::compute_requires_grad(x, packed, absmax, bias, nested_absmax, nested_code)) {
    return call_below_autograd(linear_4bit_op(), x, packed, absmax, blocksize, quant_type, weight_shape, bias,
                               nested_absmax, nested_code, nested_offset, nested_blocksize);
  }
  return Linear4bit::apply(x, packed, absmax, blocksize, quant_type, weight_shape, bias, nested_absmax, nested_code,
                           nested_offset, nested_blocksize);
}

// int8_linear and int8_weight_linear share their weight (CB int8 [N, K], SCB float32 [N]) and so their
// backward: W = CB * SCB / 127. The bias is their last input (int8_linear has a threshold before it).
at::Tensor int8_weight(const at::Tensor& CB, const at::Tensor& SCB) {
  return CB.to(at::kFloat) * (SCB / 127.0).unsqueeze(1);
}

variable_list int8_backward(AutogradContext* ctx, const at::Tensor& grad, size_t n_inputs) {
  variable_list out(n_inputs);
  if (ctx->needs_input_grad(0)) {
    const auto saved = ctx->get_saved_variables();
    out[0] = grad_input(grad, int8_weight(saved[0], saved[1]).to(grad.scalar_type()));
  }
  if (bias_needs_grad(ctx)) out[n_inputs - 1] = grad_bias(grad);
  return out;
}

using Int8LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                       const std::optional<at::Tensor>&);
using Int8WeightLinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Int8LinearSignature>& int8_linear_op() {
  static const auto handle = op<Int8LinearSignature>("lowbit::int8_linear");
  return handle;
}

const c10::TypedOperatorHandle<Int8WeightLinearSignature>& int8_weight_linear_op() {
  static const auto handle = op<Int8WeightLinearSignature>("lowbit::int8_weight_linear");
  return handle;
}

class Int8Linear : public torch::autograd::Function<Int8Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                            double threshold, const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({CB, SCB});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return call_below_autograd(int8_linear_op(), x, CB, SCB, threshold, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return int8_backward(ctx, grads[0], 5); }
};

class Int8WeightLinear : public torch::autograd::Function<Int8WeightLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({CB, SCB});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return call_below_autograd(int8_weight_linear_op(), x, CB, SCB, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return int8_backward(ctx, grads[0], 4); }
};

at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, double threshold,
                                const std::optional<at::Tensor>& bias) {
  if (!torch::autograd::compute_requires_grad(x, CB, SCB, bias)) {
    return call_below_autograd(int8_linear_op(), x, CB, SCB, threshold, bias);
  }
  return Int8Linear::apply(x, CB, SCB, threshold, bias);
}

at::Tensor int8_weight_linear_autograd(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                       const std::optional<at::Tensor>& bias) {
  if (!torch::autograd::compute_requires_grad(x, CB, SCB, bias)) {
    return call_below_autograd(int8_weight_linear_op(), x, CB, SCB, bias);
  }
  return Int8WeightLinear::apply(x, CB, SCB, bias);
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, Autograd, m) {
  m.impl("linear_4bit", &lowbit::linear_4bit_autograd);
  m.impl("int8_linear", &lowbit::int8_linear_autograd);
  m.impl("int8_weight_linear", &lowbit::int8_weight_linear_autograd);
}

// The Weight4 view (formats.h) of a validated linear_4bit weight, for the kernels of devices with
// memory (CPU, CUDA): contiguous copies of the weight's tensors and a view of plain pointers into
// them, valid while this object lives.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "formats.h"
#include "validate.h"

namespace lowbit {

struct Weight4Tensors {
  at::Tensor packed, absmax, nested_absmax, nested_code;
  Weight4 view;

  // Arguments as validate_linear_4bit accepted them.
  Weight4Tensors(const at::Tensor& packed_, const at::Tensor& absmax_, QuantType type, int64_t N, int64_t K,
                 int64_t blocksize, const std::optional<at::Tensor>& nested_absmax_,
                 const std::optional<at::Tensor>& nested_code_, double nested_offset, int64_t nested_blocksize)
      : packed(packed_.contiguous()), absmax(absmax_.contiguous()), view{} {
    view.packed = packed.const_data_ptr<uint8_t>();
    view.N = N;
    view.K = K;
    view.blocksize = blocksize;
    for (int i = 0; i < 16; ++i) view.table[i] = codebook(type).value[i];
    if (absmax.scalar_type() == at::kFloat) {
      view.absmax = absmax.const_data_ptr<float>();
      return;
    }
    nested_absmax = nested_absmax_->contiguous();
    nested_code = nested_code_->contiguous();
    view.absmax_q = absmax.const_data_ptr<uint8_t>();
    view.nested_absmax = nested_absmax.const_data_ptr<float>();
    view.nested_code = nested_code.const_data_ptr<float>();
    view.nested_offset = static_cast<float>(nested_offset);
    view.nested_blocksize = nested_blocksize;
  }
};

// What every device's linear_4bit kernel starts with: the op's arguments validated, and its weight's view.
inline Weight4Tensors validated_weight4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                        int64_t blocksize, std::string_view quant_type, at::IntArrayRef weight_shape,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& nested_absmax,
                                        const std::optional<at::Tensor>& nested_code, double nested_offset,
                                        int64_t nested_blocksize) {
  const QuantType type = validate_linear_4bit(x, packed, absmax, blocksize, quant_type,
                                              c10::fromIntArrayRefSlow(weight_shape), bias, nested_absmax,
                                              nested_code, nested_offset, nested_blocksize);
  return Weight4Tensors(packed, absmax, type, weight_shape[0], weight_shape[1], blocksize, nested_absmax, nested_code,
                        nested_offset, nested_blocksize);
}

}  // namespace lowbit

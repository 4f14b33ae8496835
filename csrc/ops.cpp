// Every lowbit operator schema, in one place. Device kernels live in csrc/<device>/ and register
// themselves with TORCH_LIBRARY_IMPL; the Meta kernels (what meta tensors and torch.compile's fake
// tensors run) are in csrc/meta.cpp; autograd for the linear ops is in csrc/autograd.cpp.
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

TORCH_LIBRARY(lowbit, m) {
  // 4-bit blockwise (NF4 / FP4). A is flattened row-major; one float32 absmax per block.
  // Returns (packed uint8 [(numel + 1) / 2, 1], absmax float32 [ceil(numel / blocksize)]).
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // The same format with a searched scale per block (see csrc/cpu/quantize_4bit_search.cpp): each block
  // tries absmax * r for r in ratios and a least-squares refit, keeping the smallest error weighted by
  // importance[i % K] (float32 [A.size(-1)], e.g. mean squared input activations; None: uniform).
  m.def("quantize_4bit_search(Tensor A, int blocksize, str quant_type, float[] ratios, Tensor? importance=None) "
        "-> (Tensor, Tensor)");
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
        "ScalarType dtype) -> Tensor");

  // 8-bit blockwise against a sorted 256-entry code table (used for double quantization of absmax).
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");

  // y = x @ dequant(W).T + bias without materializing dequant(W). W is weight_shape = [out_features,
  // in_features], packed as quantize_4bit writes it. absmax is float32, or uint8 codes when double-quantized:
  // then scale[b] = nested_code[absmax[b]] * nested_absmax[b / nested_blocksize] + nested_offset.
  m.def("linear_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] weight_shape, "
        "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, float nested_offset=0.0, "
        "int nested_blocksize=256) -> Tensor");

  // LLM.int8(): per-row absmax int8 quantization. Elements with |a| >= threshold are outliers
  // (threshold 0 disables): they are left out of the row absmax and their whole columns are
  // zeroed in the int8 result; the third output lists those columns (int64, possibly empty).
  m.def("int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor)");
  // int8 [M, K] x int8 [N, K] -> int32 [M, N] (A @ B.T), exact.
  m.def("int8_mm(Tensor A, Tensor B) -> Tensor");
  // y = LLM.int8() linear: int8 matmul of the non-outlier part, rescaled by row and weight scales,
  // plus the outlier columns in float against the dequantized weight columns, plus bias.
  // CB int8 [N, K] = round(W * 127 / SCB), SCB float32 [N] = row absmax of W.
  m.def("int8_linear(Tensor x, Tensor CB, Tensor SCB, float threshold=0.0, Tensor? bias=None) -> Tensor");
  // y = x @ (CB * SCB / 127).T + bias: the same int8 weight, with activations kept in floating point
  // (weight-only int8, W8A16): no activation rounding, no outlier columns.
  m.def("int8_weight_linear(Tensor x, Tensor CB, Tensor SCB, Tensor? bias=None) -> Tensor");

  // The instruction set the CPU kernels use for calls made now: amx, avx512, avx2 or portable (csrc/cpu/isa.h).
  m.def("cpu_isa() -> str", [] { return std::string(lowbit::isa_name(lowbit::cpu_isa())); });
}

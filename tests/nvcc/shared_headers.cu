// Compile check, not a kernel lowbit ships: every header a csrc/cuda/*.cu file shares with the CPU
// kernels compiles under nvcc, and each host/device helper compiles for the device. .ci/run builds
// this file for sm_80 and sm_90 and reads its SASS: the format arithmetic must contain no fused
// multiply-add (see "Bit parity across devices" in csrc/formats.h).
#include "checks.h"
#include "formats.h"
#include "validate.h"

namespace lowbit {

__global__ void format_helpers_probe(Codebook4 book, Weight4 w, const float* x, float divisor, uint8_t* codes,
                                     float* values) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const uint8_t code = book.encode(div_rn(x[i], divisor));
  codes[i] = pack_codes(code, code_at(w.packed, i));
  values[i] = add_rn(w.value(i, w.scale(i / w.blocksize)), mul_rn(book.value[code], x[i]));
}

}  // namespace lowbit

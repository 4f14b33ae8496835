#!/usr/bin/env bash
# Compiles every CUDA source for Ampere (sm_80) and Hopper (sm_90), where no GPU is needed:
#  * csrc/cuda/*.cu, the kernels lowbit ships;
#  * tests/nvcc/shared_headers.cu, which includes every header csrc/cuda shares with the CPU kernels
#    and calls each host/device format helper from a kernel. Its PTX must hold no fused multiply-add
#    and only explicitly rounded float multiplies/adds (mul.rn / add.rn, which ptxas never fuses):
#    the bit-parity rule of csrc/formats.h.
# Run from the repository root with the Python that has pip (and torch). NVCC overrides the compiler.
# The headers are a CUDA build's of torch: the installed torch's when it has CUDA, else those of the CUDA
# torch wheel pip resolves (a CPU build lacks generated CUDA headers such as c10/cuda/impl/cuda_cmake_macros.h).
set -euo pipefail
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if python -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  torch_include=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
  # The nvidia-* wheels' headers (cuBLASLt among them), as CMakeLists.txt adds them.
  torch_include="$torch_include $(python -c "import os, nvidia; print(' '.join('-I' + os.path.join(p, d, 'include') for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, 'include'))))" 2>/dev/null || true)"
else
  python -m pip download --quiet --no-deps --only-binary=:all: --dest "$scratch" torch
  unzip -q "$scratch"/torch-*.whl 'torch/include/*' -d "$scratch"
  torch_include="-I$scratch/torch/include -I$scratch/torch/include/torch/csrc/api/include"
  echo "nvcc: headers of $(basename "$scratch"/torch-*.whl) (the installed torch has no CUDA)"
fi
# cuBLASLt's header (csrc/cuda/int8_mm.cu): the toolkit's or a CUDA torch's nvidia-cublas wheel's, else
# the headers of the nvidia-cublas wheel pip resolves (some toolkits ship the library without the header).
if ! echo '#include <cublasLt.h>' | "$NVCC" $torch_include -x cu -E - -o /dev/null >/dev/null 2>&1; then
  python -m pip download --quiet --no-deps --only-binary=:all: --dest "$scratch/cublas" nvidia-cublas
  unzip -q "$scratch"/cublas/nvidia_cublas-*.whl '*/include/*' -d "$scratch/cublas"
  cublas_header=$(find "$scratch/cublas" -name cublasLt.h | head -1)
  torch_include="$torch_include -I$(dirname "$cublas_header")"
  echo "nvcc: cublasLt.h from $(basename "$scratch"/cublas/nvidia_cublas-*.whl)"
fi
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -Icsrc $torch_include)
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

shopt -s nullglob
for src in csrc/cuda/*.cu tests/nvcc/*.cu; do
  echo "nvcc: $src (sm_80, sm_90)"
  "$NVCC" "${flags[@]}" "${archs[@]}" -c "$src" -o /dev/null
done

probe=tests/nvcc/shared_headers.cu
ptx="$scratch/probe.ptx"
"$NVCC" "${flags[@]}" -arch=compute_80 -ptx "$probe" -o "$ptx"
unfused_ok=$(grep -cE '\b(mul|add|sub)\.rn\.f32' "$ptx" || true)
if grep -qE '\bfma\.|\b(mul|add|sub)\.f32\b' "$ptx" || [ "$unfused_ok" -eq 0 ]; then
  echo "nvcc: $probe: format arithmetic may be fused on the device (see csrc/formats.h):" >&2
  grep -nE '\bfma\.|\b(mul|add|sub)(\.rn)?\.f32\b' "$ptx" >&2 || true
  exit 1
fi
echo "nvcc: $probe: $unfused_ok explicitly rounded float ops, no fused multiply-add"

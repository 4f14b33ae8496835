#!/usr/bin/env bash
# lowbit on aarch64, where no Arm machine is at hand:
#  * cross-compiles every CPU source (csrc/*.cpp, csrc/cpu/*.cpp) for aarch64 against the installed torch's headers
#    (they are the same on every architecture), as an Arm build would compile them, warnings as in CMakeLists.txt;
#  * builds tests/arm/neon_kernels_test.cpp (the NEON kernels, no ATen) statically for aarch64 and runs it under
#    qemu-user twice: on an emulated CPU with the dot product instructions (`-cpu max`, every NEON path) and on one
#    without (`-cpu cortex-a57`, the plain NEON int8 path and the level detection).
# Speed is not measurable under an emulator. Run from the repository root with the Python that has torch.
# Needs g++-aarch64-linux-gnu and qemu-user (Debian/Ubuntu packages); installs them with apt-get when it can.
set -euo pipefail
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  echo "arm: installing g++-aarch64-linux-gnu and qemu-user"
  sudo_=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null
fi
torch_include=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")
flags=(-std=c++20 -O3 -ffp-contract=off -fopenmp -Wall -Wextra -Wno-unused-parameter -Wno-psabi -Wno-maybe-uninitialized -Werror -Icsrc $torch_include)

for src in csrc/*.cpp csrc/cpu/*.cpp; do
  echo "arm: $CXX -fsyntax-only $src"
  "$CXX" "${flags[@]}" -fsyntax-only "$src"
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$CXX" "${flags[@]}" -static tests/arm/neon_kernels_test.cpp -o "$scratch/neon_kernels_test"
qemu-aarch64 -cpu max "$scratch/neon_kernels_test" --expect-dotprod=1
qemu-aarch64 -cpu cortex-a57 "$scratch/neon_kernels_test" --expect-dotprod=0

// Which vector instruction set the CPU kernels may use. The AVX-512 kernels are compiled with
// target attributes and chosen at run time, so one build runs on any x86-64; everything else
// (other CPUs, other architectures, or LOWBIT_CPU_ISA=portable for testing) takes the portable
// path, which the compiler auto-vectorizes.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lowbit {

inline bool use_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* forced = std::getenv("LOWBIT_CPU_ISA");  // read per call so tests can flip it
  return supported && !(forced && std::strcmp(forced, "portable") == 0);
#else
  return false;
#endif
}

}  // namespace lowbit

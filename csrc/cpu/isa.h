// Which vector instruction set the CPU kernels may use. The AVX-512 kernels are compiled with
// target attributes and chosen at run time, so one build runs on any x86-64; everything else
// (other CPUs, other architectures, or LOWBIT_CPU_ISA=portable for testing) takes the portable
// path, which the compiler auto-vectorizes.
#pragma once

#include <cstdlib>
#include <cstring>

// LOWBIT_X86: this compiler can build AVX-512 functions (with LOWBIT_AVX512) into any x86-64 build.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_X86 1
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw")))
#include <immintrin.h>
#else
#define LOWBIT_X86 0
#endif

namespace lowbit {

inline bool use_avx512() {
#if LOWBIT_X86
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* forced = std::getenv("LOWBIT_CPU_ISA");  // read per call so tests can flip it
  return supported && !(forced && std::strcmp(forced, "portable") == 0);
#else
  return false;
#endif
}

}  // namespace lowbit

// Which vector instruction set the CPU kernels may use, chosen at run time per call.
//
// Kernels for each x86 level are compiled into one build with target attributes (LOWBIT_AVX2, LOWBIT_AVX512),
// so a single library runs on any x86-64 and takes the best path the CPU has:
//   amx      AVX-512 + AMX-BF16 tiles (Sapphire Rapids and later): int8_weight_linear's many-rows GEMM
//   avx512   AVX-512F/BW (Skylake-X and later, Zen 4/5)
//   avx2     AVX2 + FMA, x86-64-v3 (Haswell and later, every Zen, Intel Core laptops without AVX-512)
//   portable plain C++ the compiler auto-vectorizes for the build's baseline (SSE2 on x86-64; other CPUs)
// Each level's kernels use only its own instructions, so forcing a lower level with LOWBIT_CPU_ISA (tests and
// benchmarks do, to reach every path on one machine) runs exactly what a CPU of that level runs.
//
// Where a new ISA plugs in: a level here (with its detection and its LOWBIT_* attribute), then in each op's
// file a kernel under that attribute and a case in the op's dispatch on cpu_isa(). Ops without one fall to the
// next lower level they have.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

// LOWBIT_X86: this compiler can build AVX2 and AVX-512 functions into any x86-64 build.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_X86 1
#define LOWBIT_AVX2 __attribute__((target("avx2,fma")))
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw")))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LOWBIT_X86 0
#endif

namespace lowbit {

enum class CpuIsa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };

inline const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::amx: return "amx";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "portable";
  }
}

#if LOWBIT_X86
// Whether the CPU has AMX-BF16 and Linux granted this process the tile state (a process must ask once,
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
inline bool amx_grant() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return (d & kAmxBf16) && (d & kAmxTile) && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

// The best level this CPU and operating system allow.
inline CpuIsa detected_isa() {
#if LOWBIT_X86
  static const CpuIsa detected = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
      return amx_grant() ? CpuIsa::amx : CpuIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
    return CpuIsa::portable;
  }();
  return detected;
#else
  return CpuIsa::portable;
#endif
}

// The level the kernels use now: the detected one, or a lower one named by LOWBIT_CPU_ISA (amx, avx512, avx2,
// portable; "native" or unset: as detected). Read per call, so tests can change it between calls. A level above
// the CPU's is capped at what the CPU has; a name lowbit does not know is an error rather than a silent default.
inline CpuIsa cpu_isa() {
  const CpuIsa detected = detected_isa();
  const char* forced = std::getenv("LOWBIT_CPU_ISA");
  if (!forced || !*forced || std::strcmp(forced, "native") == 0) return detected;
  for (CpuIsa level : {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx})
    if (std::strcmp(forced, isa_name(level)) == 0) return std::min(level, detected);
  TORCH_CHECK_VALUE(false, "LOWBIT_CPU_ISA=", forced,
                    " is not a CPU path lowbit has: use amx, avx512, avx2, portable or native");
}

inline bool use_avx512() { return cpu_isa() >= CpuIsa::avx512; }
// The AVX2 kernels run on AVX2 CPUs only: where AVX-512 is allowed, its kernels take the call.
inline bool use_avx2() { return cpu_isa() == CpuIsa::avx2; }

}  // namespace lowbit

// Which vector instruction set the CPU kernels may use, chosen at run time per call.
//
// Kernels for each level of an architecture are compiled into one build with target attributes (LOWBIT_AVX2,
// LOWBIT_AVX512, LOWBIT_DOTPROD), so a single library runs on any CPU of that architecture and takes the best path
// the CPU has. Levels, lowest first, per architecture:
//  x86-64:
//   portable plain C++ the compiler auto-vectorizes for the build's baseline (SSE2)
//   avx2     AVX2 + FMA, x86-64-v3 (Haswell and later, every Zen, Intel Core laptops without AVX-512)
//   avx512   AVX-512F/BW (Skylake-X and later, Zen 4/5)
//   amx      AVX-512 + AMX-BF16 tiles (Sapphire Rapids and later): int8_weight_linear's many-rows GEMM
//  aarch64:
//   portable plain C++, auto-vectorized for NEON (the aarch64 baseline)
//   neon     lowbit's NEON kernels (every aarch64 CPU)
//   dotprod  NEON + the int8 dot product sdot (Armv8.2+: Graviton 2+, Ampere Altra, Apple M1+, Cortex-A76+)
//  other architectures: portable only.
// Each level's kernels use only its own instructions, so forcing a lower level with LOWBIT_CPU_ISA (tests and
// benchmarks do, to reach every path on one machine) runs exactly what a CPU of that level runs.
//
// Where a new ISA plugs in: a level here (in CpuIsa, in its architecture's kLevels, with its detection and its
// LOWBIT_* attribute), then in each op's file a kernel under that attribute and a case in the op's dispatch on
// cpu_isa(). Ops without one fall to the next lower level they have.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

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

// LOWBIT_ARM: an aarch64 build; NEON is part of the baseline there, sdot needs LOWBIT_DOTPROD on the function.
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_ARM 1
#if defined(__clang__)
#define LOWBIT_DOTPROD __attribute__((target("dotprod")))
#else
#define LOWBIT_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#include <arm_neon.h>
#if defined(__APPLE__)
#include <sys/sysctl.h>
#else
#include <sys/auxv.h>
#endif
#else
#define LOWBIT_ARM 0
#endif

namespace lowbit {

// Levels compare only within one architecture (each op's dispatch tests the levels of the architecture it was
// built for), so x86's and Arm's share the values above portable.
enum class CpuIsa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3, neon = 1, dotprod = 2 };

// This build's levels, lowest first.
#if LOWBIT_X86
inline constexpr CpuIsa kLevels[] = {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx};
inline constexpr const char* kLevelNames[] = {"portable", "avx2", "avx512", "amx"};
#elif LOWBIT_ARM
inline constexpr CpuIsa kLevels[] = {CpuIsa::portable, CpuIsa::neon, CpuIsa::dotprod};
inline constexpr const char* kLevelNames[] = {"portable", "neon", "dotprod"};
#else
inline constexpr CpuIsa kLevels[] = {CpuIsa::portable};
inline constexpr const char* kLevelNames[] = {"portable"};
#endif

inline const char* isa_name(CpuIsa isa) { return kLevelNames[static_cast<int>(isa)]; }

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

#if LOWBIT_ARM
// Whether the CPU has the int8 dot product instructions (FEAT_DotProd).
inline bool arm_has_dotprod() {
#if defined(__APPLE__)
  int has = 0;
  size_t size = sizeof(has);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &size, nullptr, 0) == 0 && has;
#else
  constexpr unsigned long kHwcapAsimdDp = 1ul << 20;  // HWCAP_ASIMDDP of <asm/hwcap.h>
  return getauxval(AT_HWCAP) & kHwcapAsimdDp;
#endif
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
#elif LOWBIT_ARM
  static const CpuIsa detected = arm_has_dotprod() ? CpuIsa::dotprod : CpuIsa::neon;
  return detected;
#else
  return CpuIsa::portable;
#endif
}

// The level the kernels use now: the detected one, or a lower one named by LOWBIT_CPU_ISA (one of this
// architecture's levels; "native" or unset: as detected). Read per call, so tests can change it between calls. A
// level above the CPU's is capped at what the CPU has; a name that is not a level of this architecture is an error
// rather than a silent default.
inline CpuIsa cpu_isa() {
  const CpuIsa detected = detected_isa();
  const char* forced = std::getenv("LOWBIT_CPU_ISA");
  if (!forced || !*forced || std::strcmp(forced, "native") == 0) return detected;
  for (CpuIsa level : kLevels)
    if (std::strcmp(forced, isa_name(level)) == 0) return std::min(level, detected);
  std::string known;
  for (const char* name : kLevelNames) known += std::string(name) + ", ";
  TORCH_CHECK_VALUE(false, "LOWBIT_CPU_ISA=", forced, " is not a CPU path lowbit has on this architecture: use ",
                    known, "or native");
}

#if LOWBIT_X86
inline bool use_avx512() { return cpu_isa() >= CpuIsa::avx512; }
// The AVX2 kernels run on AVX2 CPUs only: where AVX-512 is allowed, its kernels take the call.
inline bool use_avx2() { return cpu_isa() == CpuIsa::avx2; }
#endif

}  // namespace lowbit

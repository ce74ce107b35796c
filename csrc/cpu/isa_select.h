// csrc/cpu/isa_select.h — which vector-ISA build of a CPU kernel this machine runs: AVX-512
// (F/BW/VL/DQ + FMA + F16C), AVX2 (+ FMA + F16C) or the baseline, detected once; an environment
// variable per kernel can force a lower one (tests run every build the machine can execute).
// Included by the dispatching .cpp files only (compiled for the baseline ISA).
#pragma once

#include <cstdlib>
#include <cstring>

namespace iddpm::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

// The best ISA of this CPU, or a lower one named by the variable `env` ("default" or "avx2").
inline Isa select_isa(const char* env) {
#if defined(__x86_64__)
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kDefault;
  }();
  Isa isa = hw;
  if (const char* want = std::getenv(env)) {
    if (std::strcmp(want, "default") == 0) isa = Isa::kDefault;
    if (std::strcmp(want, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
#else
  (void)env;
  return Isa::kDefault;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace iddpm::cpu

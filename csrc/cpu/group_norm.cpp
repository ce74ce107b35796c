// csrc/cpu/group_norm.cpp — picks the vector-ISA build of the CPU group-norm kernel.
#include "cpu/group_norm.h"

#include <cstdlib>
#include <cstring>

#include "cpu/group_norm_isa.h"

namespace iddpm::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa best_isa() {
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
  // A lower ISA can be forced (tests run every build this machine can execute).
  if (const char* env = std::getenv("IDDPM_GN_CPU_ISA")) {
    if (std::strcmp(env, "default") == 0) isa = Isa::kDefault;
    if (std::strcmp(env, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
#else
  return Isa::kDefault;
#endif
}

}  // namespace

const char* group_norm_isa() {
  switch (best_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

void group_norm_act_fwd(const GroupNormActFwdParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return gn_avx512::gn_fwd(p);
  if (isa == Isa::kAvx2) return gn_avx2::gn_fwd(p);
#endif
  gn_default::gn_fwd(p);
}

void group_norm_act_bwd(const GroupNormActBwdParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return gn_avx512::gn_bwd(p);
  if (isa == Isa::kAvx2) return gn_avx2::gn_bwd(p);
#endif
  gn_default::gn_bwd(p);
}

}  // namespace iddpm::cpu

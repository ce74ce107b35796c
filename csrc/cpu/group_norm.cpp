// csrc/cpu/group_norm.cpp — picks the vector-ISA build of the CPU group-norm kernel.
#include "cpu/group_norm.h"

#include "cpu/group_norm_isa.h"

namespace iddpm::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa best_isa() {
#if defined(__x86_64__)
  static const Isa isa = [] {
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
  if (best_isa() == Isa::kAvx512) return gn_avx512::gn_fwd(p);
  if (best_isa() == Isa::kAvx2) return gn_avx2::gn_fwd(p);
#endif
  gn_default::gn_fwd(p);
}

void group_norm_act_bwd(const GroupNormActBwdParams& p) {
#if defined(__x86_64__)
  if (best_isa() == Isa::kAvx512) return gn_avx512::gn_bwd(p);
  if (best_isa() == Isa::kAvx2) return gn_avx2::gn_bwd(p);
#endif
  gn_default::gn_bwd(p);
}

}  // namespace iddpm::cpu

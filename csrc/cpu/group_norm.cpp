// csrc/cpu/group_norm.cpp — picks the vector-ISA build of the CPU group-norm kernel.
#include "cpu/group_norm.h"

#include "cpu/group_norm_isa.h"
#include "cpu/isa_select.h"

namespace iddpm::cpu {
namespace {

Isa best_isa() { return select_isa("IDDPM_GN_CPU_ISA"); }

}  // namespace

const char* group_norm_isa() { return isa_name(best_isa()); }

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

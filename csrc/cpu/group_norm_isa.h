// csrc/cpu/group_norm_isa.h — the entry points each vector-ISA build of the CPU group-norm kernel
// (group_norm_isa_{default,avx2,avx512}.cpp, all csrc/cpu/group_norm_kernel.inc) provides.
#pragma once

#include "common/group_norm_params.h"

namespace iddpm::cpu {

#define IDDPM_GN_DECLARE_ISA(ns)               \
  namespace ns {                               \
  void gn_fwd(const GroupNormActFwdParams& p); \
  void gn_bwd(const GroupNormActBwdParams& p); \
  }

IDDPM_GN_DECLARE_ISA(gn_default)
#if defined(__x86_64__)
IDDPM_GN_DECLARE_ISA(gn_avx2)
IDDPM_GN_DECLARE_ISA(gn_avx512)
#endif

#undef IDDPM_GN_DECLARE_ISA

}  // namespace iddpm::cpu

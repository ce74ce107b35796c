// csrc/cpu/group_norm.h — CPU kernels of iddpm::group_norm_act and its backward over raw
// pointers (common/group_norm_params.h; no tensor types here). Each picks the vector-ISA build
// of csrc/cpu/group_norm_kernel.inc the CPU runs (avx512, avx2 or the baseline).
#pragma once

#include "common/dtype.h"
#include "common/group_norm_params.h"

namespace iddpm::cpu {

// The dtypes of x the CPU kernels accept.
inline constexpr DType kGroupNormDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                             DType::kBFloat16};

// y, mean, rstd from x (common/group_norm_math.h has the formulas).
void group_norm_act_fwd(const GroupNormActFwdParams& p);
// grad_x, grad_weight, grad_bias, grad_scale, grad_shift from grad_out.
void group_norm_act_bwd(const GroupNormActBwdParams& p);
// "avx512", "avx2" or "default": the build the kernels run on this CPU (IDDPM_GN_CPU_ISA=avx2 or
// default forces a lower one).
const char* group_norm_isa();

}  // namespace iddpm::cpu

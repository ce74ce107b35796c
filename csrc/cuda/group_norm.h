// csrc/cuda/group_norm.h — CUDA launchers of iddpm::group_norm_act and its backward over raw
// pointers and a stream (common/group_norm_params.h). Plain C++ (no torch, no CUDA headers) so
// the glue in csrc/ops can include it.
#pragma once

#include "common/dtype.h"
#include "common/group_norm_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace iddpm::cuda {

// The dtypes of x the CUDA kernels accept.
inline constexpr DType kGroupNormDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                             DType::kBFloat16};
// At most this many batch items × groups N·G: one block per (item, group) along gridDim.x.
inline constexpr int64_t kGroupNormMaxItemGroups = int64_t{2147483647};

// Each returns a cudaError_t value (0 = success) of its launches. The backward needs p.work:
// 2·N·C + 2·N·G elements of the accumulation type.
int group_norm_act_fwd(const GroupNormActFwdParams& p, cudaStream_t stream);
int group_norm_act_bwd(const GroupNormActBwdParams& p, cudaStream_t stream);

}  // namespace iddpm::cuda

// csrc/cuda/gather_coefs.h — CUDA launcher of iddpm::gather_coefs over raw pointers and a
// stream. Plain C++ (no torch, no CUDA headers) so the glue in csrc/ops can include it.
#pragma once

#include "common/gather_coefs_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace iddpm::cuda {

// out[b] = table[t[b]] (common/gather_coefs_params.h); an out-of-range t gives a NaN row (no
// host sync to raise). Returns a cudaError_t value (0 = success) of the launch.
int gather_coefs(const GatherCoefsParams& params, cudaStream_t stream);

}  // namespace iddpm::cuda

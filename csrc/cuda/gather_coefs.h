// csrc/cuda/gather_coefs.h — CUDA launcher of iddpm::gather_coefs over raw pointers and a
// stream. Plain C++ (no torch, no CUDA headers) so the glue in csrc/ops can include it.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace iddpm::cuda {

// table: [T, K] f32, t: [B], out: [B, K] f32. Out-of-range t gives NaN rows.
// Returns a cudaError_t value (0 = success) of the launch.
template <typename index_t>
int gather_coefs(const float* table, int64_t T, int64_t K, const index_t* t, int64_t B, float* out,
                 cudaStream_t stream);

}  // namespace iddpm::cuda

// csrc/common/gather_coefs_params.h — the plain argument block of iddpm::gather_coefs. No torch
// and no CUDA types: the glue in csrc/ops fills it, csrc/cpu and csrc/cuda read it.
#pragma once

#include <cstdint>

namespace iddpm {

struct GatherCoefsParams {
  const float* table = nullptr;  // [T, K] float32 row-major, one row of coefficients per timestep
  int64_t T = 0, K = 0;
  const void* t = nullptr;  // [B] int64 or int32 timesteps
  bool t_is_int64 = true;
  int64_t B = 0;
  float* out = nullptr;  // [B, K] float32: out[b, k] = table[t[b], k]
};

}  // namespace iddpm

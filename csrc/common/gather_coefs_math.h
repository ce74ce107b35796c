// csrc/common/gather_coefs_math.h — per-element math of the schedule-coefficient gather
// (iddpm::gather_coefs), shared by csrc/cpu/gather_coefs.cpp and csrc/cuda/gather_coefs.cu.
//
// table: [T, K] float32 row-major, one row of K coefficients per timestep.
// t:     [B] integer timesteps.
// out:   [B, K] float32, out[b, k] = table[t[b], k].
// (common/gather_coefs_params.h holds these pointers and sizes.)
#pragma once

#include <cstdint>
#include <limits>

#include "common/gather_coefs_params.h"
#include "common/macros.h"

namespace iddpm {

// True when timestep `tt` indexes a row of a table with `T` rows.
template <typename index_t>
IDDPM_HD bool timestep_in_range(index_t tt, int64_t T) {
  return tt >= 0 && static_cast<int64_t>(tt) < T;
}

// One output element. An out-of-range timestep gives NaN (the CUDA path cannot
// raise without a host sync; the CPU glue raises before calling the kernel).
template <typename index_t>
IDDPM_HD float gather_coef(const float* table, int64_t T, int64_t K, index_t tt, int64_t k) {
  if (!timestep_in_range(tt, T)) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  return table[static_cast<int64_t>(tt) * K + k];
}

}  // namespace iddpm

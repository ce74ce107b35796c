// csrc/cpu/gather_coefs.h — CPU kernel of iddpm::gather_coefs over raw pointers (no tensor
// types here).
#pragma once

#include <cstdint>

#include "common/gather_coefs_params.h"

namespace iddpm::cpu {

// out[b] = table[t[b]] (common/gather_coefs_params.h describes the arguments).
// Returns -1, or the first b whose t[b] is outside [0, T) (then nothing is written).
int64_t gather_coefs(const GatherCoefsParams& params);

}  // namespace iddpm::cpu

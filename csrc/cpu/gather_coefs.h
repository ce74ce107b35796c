// csrc/cpu/gather_coefs.h — CPU kernel of iddpm::gather_coefs over raw pointers (no tensor
// types here).
#pragma once

#include <cstdint>

namespace iddpm::cpu {

// table: [T, K] f32, t: [B], out: [B, K] f32. Returns -1, or the first b whose
// t[b] is outside [0, T) (then nothing is written).
template <typename index_t>
int64_t gather_coefs(const float* table, int64_t T, int64_t K, const index_t* t, int64_t B,
                     float* out);

}  // namespace iddpm::cpu

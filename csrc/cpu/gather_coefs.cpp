// csrc/cpu/gather_coefs.cpp — CPU kernel of iddpm::gather_coefs.
#include <ATen/Parallel.h>

#include "common/gather_coefs_math.h"
#include "cpu/gather_coefs.h"

namespace iddpm::cpu {

template <typename index_t>
int64_t gather_coefs(const float* table, int64_t T, int64_t K, const index_t* t, int64_t B,
                     float* out) {
  // Validate everything first so that a bad timestep leaves `out` untouched.
  for (int64_t b = 0; b < B; ++b) {
    if (!timestep_in_range(t[b], T)) return b;
  }
  at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < K; ++k) out[b * K + k] = gather_coef(table, T, K, t[b], k);
    }
  });
  return -1;
}

template int64_t gather_coefs<int64_t>(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                       float*);
template int64_t gather_coefs<int32_t>(const float*, int64_t, int64_t, const int32_t*, int64_t,
                                       float*);

}  // namespace iddpm::cpu

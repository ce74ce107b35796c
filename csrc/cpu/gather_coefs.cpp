// csrc/cpu/gather_coefs.cpp — CPU kernel of iddpm::gather_coefs.
#include "cpu/gather_coefs.h"

#include <ATen/Parallel.h>

#include "common/gather_coefs_math.h"

namespace iddpm::cpu {
namespace {

template <typename index_t>
int64_t gather(const GatherCoefsParams& p) {
  const float* table = p.table;
  const index_t* t = static_cast<const index_t*>(p.t);
  const int64_t T = p.T, K = p.K, B = p.B;
  float* out = p.out;
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

}  // namespace

int64_t gather_coefs(const GatherCoefsParams& p) {
  return p.t_is_int64 ? gather<int64_t>(p) : gather<int32_t>(p);
}

}  // namespace iddpm::cpu

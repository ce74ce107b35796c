// python/schemas.cpp — the one schema block of the `iddpm` operator namespace.
// Implementations are registered per dispatch key in csrc/ops/*.cpp; fake (meta)
// implementations and autograd formulas in iddpm_ext/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(iddpm, m) {
  // ---- schedule coefficients (csrc/ops/gather_coefs.cpp) ----
  // table: [T, K] f32, t: [B] int -> [B, K] f32 with out[b] = table[t[b]].
  m.def("gather_coefs(Tensor table, Tensor t) -> Tensor");
}

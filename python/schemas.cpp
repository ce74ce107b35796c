// python/schemas.cpp — the one schema block of the `iddpm` operator namespace.
// Implementations are registered per dispatch key in csrc/ops/*.cpp; fake (meta)
// implementations and autograd formulas in iddpm_ext/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(iddpm, m) {
  // ---- schedule coefficients (csrc/ops/gather_coefs.cpp) ----
  // table: [T, K] f32, t: [B] int -> [B, K] f32 with out[b] = table[t[b]].
  m.def("gather_coefs(Tensor table, Tensor t) -> Tensor");

  // ---- fused QKV self-attention (csrc/ops/attention.cpp) ----
  // qkv: [B, 3·H·C, T] (per head: q | k | v) -> out [B, H·C, T] in qkv's dtype,
  // lse [B, H, T] (logsumexp of the scaled logits, saved for the backward; f32, f64 for f64).
  m.def("qkv_attention(Tensor qkv, int num_heads) -> (Tensor out, Tensor lse)");
  // grad_out, out: [B, H·C, T], lse: [B, H, T] -> grad_qkv [B, 3·H·C, T].
  m.def(
      "qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, "
      "int num_heads) -> Tensor");
}

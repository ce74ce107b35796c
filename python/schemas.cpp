// python/schemas.cpp — the one schema block of the `iddpm` operator namespace.
// Implementations are registered per dispatch key in csrc/ops/<op>.cpp; fake (meta)
// implementations and autograd formulas in iddpm_ext/ops/<op>.py (op = gather_coefs, step,
// attention, group_norm, winograd).
#include <torch/library.h>

TORCH_LIBRARY(iddpm, m) {
  // ---- schedule coefficients (csrc/ops/gather_coefs.cpp, docs/gather_coefs.md) ----
  // table: [T, K] f32, t: [B] int -> [B, K] f32 with out[b] = table[t[b]].
  m.def("gather_coefs(Tensor table, Tensor t) -> Tensor");

  // ---- fused reverse-diffusion steps (csrc/ops/step.cpp, docs/step.md) ----
  // x: [B, C, ...] f32/f16/bf16; model_output: [B, C or 2C, ...]; t: [B] int; table: [T, K] f32
  // (GaussianDiffusion.coef_table). Returns (x_{t-1} or x_{t+1}, pred_x0) in x's dtype and
  // layout; pred_x0 is an empty [0] tensor unless return_pred_xstart. Noise: `noise`, else
  // Philox in the kernel from `generator` (or the default generator of x's device), item b
  // taking the stream of global sample sample_index[b] ([B] int; None: b; docs/step.md).
  m.def(
      "p_sample_step(Tensor x, Tensor model_output, Tensor t, Tensor table, str model_mean_type, "
      "str model_var_type, bool clip_denoised, Tensor? noise=None, Generator? generator=None, "
      "bool return_pred_xstart=True, Tensor? sample_index=None) -> (Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "ddim_step(Tensor x, Tensor model_output, Tensor t, Tensor table, str model_mean_type, "
      "str model_var_type, bool clip_denoised, float eta, Tensor? noise=None, "
      "Generator? generator=None, bool return_pred_xstart=True, Tensor? sample_index=None) "
      "-> (Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "ddim_reverse_step(Tensor x, Tensor model_output, Tensor t, Tensor table, "
      "str model_mean_type, str model_var_type, bool clip_denoised, "
      "bool return_pred_xstart=True) -> (Tensor, Tensor)");

  // ---- fused QKV self-attention (csrc/ops/attention.cpp) ----
  // qkv: [B, 3·H·C, T] (per head: q | k | v) -> out [B, H·C, T] in qkv's dtype,
  // lse [B, H, T] (logsumexp of the scaled logits, saved for the backward; f32, f64 for f64).
  m.def("qkv_attention(Tensor qkv, int num_heads) -> (Tensor out, Tensor lse)");
  // grad_out, out: [B, H·C, T], lse: [B, H, T] -> grad_qkv [B, 3·H·C, T].
  m.def(
      "qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, "
      "int num_heads) -> Tensor");
  // CPU bf16 inference forward: qkv [B, 3·H·C, T] bf16 (any strides; token-major, channel stride
  // 1, is read in place) -> out [B, H·C, T] bf16, token-major (strides T·H·C, 1, H·C). No lse, no
  // backward.
  m.def("qkv_attention_bf16(Tensor qkv, int num_heads) -> Tensor");

  // ---- fused GroupNorm + scale-shift + SiLU (csrc/ops/group_norm.cpp) ----
  // x: [N, C, *] (NCHW or channels-last); weight, bias: [C]; scale, shift: [N, C] ->
  // out = act((GN(x)·weight + bias)·(1 + scale) + shift) in x's dtype and memory format,
  // act = SiLU when silu else identity; mean, rstd: [N, num_groups] (f32, f64 for f64 x) saved
  // for the backward.
  m.def(
      "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
      "Tensor? shift, float eps, bool silu) -> (Tensor out, Tensor mean, Tensor rstd)");
  // -> (grad_x, grad_weight [C], grad_bias [C], grad_scale [N, C], grad_shift [N, C]).
  m.def(
      "group_norm_act_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, "
      "int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, bool silu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- Winograd F(2x2, 3x3) / F(4x4, 3x3) convolution, CPU (csrc/ops/winograd.cpp) ----
  // weight: [Cout, Cin, 3, 3] -> [16, Cin, Cout] (the transformed weight conv3x3_winograd takes);
  // packed (bf16, AVX512-BF16 CPUs): [16, Cout/32, Cin/2, 64], for the VDPBF16PS GEMMs;
  // tile=4 (float32): F(4x4, 3x3)'s [36, Cin, Cout].
  // flip: of the filters rotated by 180° (with weight.transpose(0, 1): the input gradient's U).
  m.def("winograd_weight(Tensor weight, bool packed=False, int tile=2, bool flip=False) -> Tensor");
  // x: [N, Cin, H, W]; weight_t: winograd_weight(weight); bias: [Cout]; residual: [N, Cout, H, W]
  // -> conv2d(x, weight, bias, stride 1, padding 1) + residual, [N, Cout, H, W] channels-last.
  m.def(
      "conv3x3_winograd(Tensor x, Tensor weight_t, Tensor? bias=None, Tensor? residual=None) -> "
      "Tensor");
  // x: [N, Cin, H, W]; grad_y: [N, Cout, H, W] -> the weight gradient [Cout, Cin, 3, 3] of
  // conv2d(x, weight, stride 1, padding 1) (float32; tile 2 or 4: by F(2x2) or F(4x4)).
  m.def("conv3x3_winograd_weight_grad(Tensor x, Tensor grad_y, int tile=2) -> Tensor");
  // x: [N, C, H, W] -> a copy in channels-last (True) or contiguous NCHW (False) memory format.
  m.def("convert_layout(Tensor x, bool channels_last) -> Tensor");
}

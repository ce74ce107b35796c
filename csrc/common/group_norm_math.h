// csrc/common/group_norm_math.h — per-element math of iddpm::group_norm_act, shared by the CPU
// kernel (csrc/cpu/group_norm_kernel.inc, where V is at::vec::Vectorized<A>) and the CUDA kernel
// (csrc/cuda/group_norm.cu, V = A = float or double).
//
// Forward, per sample n and channel c of group g (mean, rstd over the group's C/G channels × S
// positions, biased variance, rstd = 1/sqrt(var + eps)):
//   a = (x - mean)·rstd·w_c + b_c           (GroupNorm's affine result)
//   h = a·(1 + scale[n,c]) + shift[n,c]     (the ResBlock's scale-shift; identity without)
//   y = silu(h) = h·sigmoid(h), or y = h
// computed as h = (x - mean)·alpha + beta with the per-(n, c) coefficients of affine() (the mean
// is subtracted first: no cancellation when the spread is small next to the mean).
//
// Backward, with dh = dy·silu'(h) (or dy), xhat = (x - mean)·rstd, k = w_c·(1 + scale[n,c]),
// per (n, c) sums over positions A = Σ dh and B = Σ dh·xhat, and per group s1 = Σ_c k·A,
// s2 = Σ_c k·B over the M = (C/G)·S elements:
//   grad_shift[n,c] = A, grad_scale[n,c] = w_c·B + b_c·A,
//   grad_bias[c] = Σ_n (1 + scale)·A, grad_weight[c] = Σ_n (1 + scale)·B,
//   grad_x = rstd·(k·dh - s1/M - xhat·s2/M) = p·dh + q·(x - mean) + r (dx_coefs()).
#pragma once

#include <cmath>

#include "common/macros.h"

namespace iddpm::gn {

// 1/sqrt(var + eps) of a group's biased variance.
template <class A>
IDDPM_HD A rstd_of(A var, A eps) {
  return A(1) / sqrt(var + eps);
}

// h = (x - mean)·alpha + beta for every element of (n, c).
template <class A>
IDDPM_HD void affine(A rstd, A w, A b, A scale, A shift, A& alpha, A& beta) {
  const A f = A(1) + scale;
  alpha = rstd * w * f;
  beta = b * f + shift;
}

// SiLU from h and sigmoid(h) (each backend computes sigmoid(h) = 1/(1 + exp(-h)) its own way).
template <class V>
IDDPM_HD V silu(V h, V sig) {
  return h * sig;
}

// dy·silu'(h) = dy·sig·(1 + h·(1 - sig)).
template <class V>
IDDPM_HD V silu_grad(V dy, V h, V sig, V one) {
  return dy * sig * (one + h * (one - sig));
}

// grad_x = p·dh + q·(x - mean) + r for the elements of (n, c); s1, s2 the group's sums,
// inv_m = 1/M.
template <class A>
IDDPM_HD void dx_coefs(A rstd, A k, A s1, A s2, A inv_m, A& p, A& q, A& r) {
  p = k * rstd;
  q = -rstd * rstd * s2 * inv_m;
  r = -rstd * s1 * inv_m;
}

}  // namespace iddpm::gn

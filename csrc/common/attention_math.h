// csrc/common/attention_math.h — per-element math of the fused QKV attention, shared by
// the CPU kernel (csrc/cpu/attention_kernel.inc, with scalar and vector types) and the CUDA
// kernels (csrc/cuda/attention_{fwd,bwd}_kernel.cuh, with float).
//
// Conventions (all kernels):
//   s    = (q · k) / sqrt(C)                     the logit of the reference
//   s2   = s · log2(e)                           logits are kept in base 2, so exp() is exp2()
//   m2   = running max of s2 over the keys seen so far (online softmax)
//   l    = running sum of exp2(s2 - m2)
//   lse  = log(sum_j exp(s_j)) = (m2 + log2(l)) · ln(2)   stored [B, H, T] f32 for the backward
//   p    = exp(s - lse) = exp2(s2 - lse · log2(e))          recomputed in the backward
//   D_i  = sum_c dO[c, i] · O[c, i]                          (FlashAttention-2's "delta")
//   dS   = p · (dP - D_i),  dP = dO_i · v_j               the gradient w.r.t. the logit s
//   dq_i = scale · sum_j dS_ij k_j,  dk_j = scale · sum_i dS_ij q_i,  dv_j = sum_i p_ij dO_i
//
// Every function is `static` (internal linkage) on purpose: the CPU build compiles this
// header once per vector ISA under different `#pragma GCC target` settings, and inline
// functions with external linkage would be merged across those translation units by the
// linker (an AVX-512 copy could end up called on a machine without it). The templates work
// for scalars and for GCC vector types alike (only + - * are used).
#pragma once

#include <cmath>

#include "common/macros.h"

#if defined(__CUDACC__)
#define IDDPM_ATTN_FN static __host__ __device__ __forceinline__
#else
#define IDDPM_ATTN_FN static inline
#endif

namespace iddpm::attn {

constexpr double kLog2e = 1.4426950408889634074;  // log2(e)
constexpr double kLn2 = 0.69314718055994530942;   // ln(2) = 1 / log2(e)

// 1/sqrt(C): the reference scales q and k by C^(-1/4) each, i.e. the logits by C^(-1/2).
template <typename A>
IDDPM_ATTN_FN A softmax_scale(long long head_dim) {
  // In double (sqrt is correctly rounded), then rounded once to A.
  return static_cast<A>(1.0 / sqrt(static_cast<double>(head_dim)));
}

// Factor applied to q·k to get s2 (base-2 logits).
template <typename A>
IDDPM_ATTN_FN A logit_scale_log2(long long head_dim) {
  return static_cast<A>((1.0 / sqrt(static_cast<double>(head_dim))) * kLog2e);
}

// Online-softmax state update for one query row after a block of keys whose largest base-2
// logit is `block_max2`. Returns the new running max; `alpha` receives the factor by which
// the old sum l and the old output accumulator must be multiplied. With m_old = -inf (no
// keys seen yet) alpha is exp2(-inf) = 0, which zeroes the (already zero) accumulators.
template <typename A, typename Max, typename Exp2>
IDDPM_ATTN_FN A online_max_update(A m_old, A block_max2, A* alpha, Max max_fn, Exp2 exp2_fn) {
  const A m_new = max_fn(m_old, block_max2);
  *alpha = exp2_fn(m_old - m_new);
  return m_new;
}

// Unnormalized probability of a key under the running max: exp2(s2 - m2).
template <typename A, typename Exp2>
IDDPM_ATTN_FN A online_prob(A s2, A m2, Exp2 exp2_fn) {
  return exp2_fn(s2 - m2);
}

// Running sum after a block: l · alpha + (sum of the block's probabilities).
template <typename A>
IDDPM_ATTN_FN A online_sum_update(A l_old, A alpha, A block_sum) {
  return l_old * alpha + block_sum;
}

// Natural-log logsumexp of one row from the final running max (base 2) and sum.
template <typename A, typename Log2>
IDDPM_ATTN_FN A row_lse(A m2, A l, Log2 log2_fn) {
  return (m2 + log2_fn(l)) * static_cast<A>(kLn2);
}

// lse in base 2, the form the backward subtracts from s2.
template <typename A>
IDDPM_ATTN_FN A lse_to_base2(A lse) {
  return lse * static_cast<A>(kLog2e);
}

// Probability recomputed in the backward: p = exp2(s2 - lse2).
template <typename A, typename Exp2>
IDDPM_ATTN_FN A recomputed_prob(A s2, A lse2, Exp2 exp2_fn) {
  return exp2_fn(s2 - lse2);
}

// Gradient w.r.t. the logit s: dS = p · (dP - D).
template <typename A, typename D>
IDDPM_ATTN_FN A logit_grad(A p, A dp, D delta) {
  return p * (dp - delta);
}

}  // namespace iddpm::attn

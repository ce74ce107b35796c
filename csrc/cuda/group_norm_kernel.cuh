// csrc/cuda/group_norm_kernel.cuh — the CUDA kernels of iddpm::group_norm_act and its backward
// (device code only; csrc/cuda/group_norm.cu launches them). One kernel per pass, templated on
// the dtype of x only:
//   forward:  stats (one block per (n, g), two-pass mean / variance), apply (elementwise);
//   backward: per-channel sums (one block per (n, g)), grad_x (elementwise), grad_weight /
//             grad_bias (one thread per channel, summing over n).
// The per-element math is common/group_norm_math.h, shared with the CPU kernel. Also compiled by
// the host compiler over tests/ops/cuda_emulation/warp_emulator.h (group_norm_emulation.cpp),
// which runs these kernels block by block on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/group_norm_math.h"
#include "common/group_norm_params.h"
#include "cuda/convert.cuh"

namespace iddpm::cuda::gn_kernels {

constexpr int kThreads = 256;

// The digits (hi, mid, lo) of a flat offset in an array of shape [*, R1, R0], advanced by a
// fixed stride with additions only (64-bit integer division is a long instruction sequence on
// the GPU): a few divisions per thread, none per element. Each digit of the stride is below its
// radix, so a digit carries at most once per step.
struct Digits {
  int64_t hi, mid, lo;
  __device__ Digits(int64_t i, int64_t R1, int64_t R0)
      : hi(i / R0 / R1), mid(i / R0 % R1), lo(i % R0) {}
  __device__ void advance(const Digits& step, int64_t R1, int64_t R0) {
    lo += step.lo;
    if (lo >= R0) lo -= R0, ++mid;
    mid += step.mid;
    if (mid >= R1) mid -= R1, ++hi;
    hi += step.hi;
  }
};

// The group of channel c (Cg channels each): a 32-bit division where the channels fit in 32
// bits (every model's case; the condition is the same for the whole grid), else a 64-bit one.
__device__ __forceinline__ int64_t group_of(int64_t c, int64_t Cg, bool narrow) {
  return narrow ? static_cast<int64_t>(static_cast<uint32_t>(c) / static_cast<uint32_t>(Cg))
                : c / Cg;
}

// The elements of the sample-major array x ([N, C, S] or, channels-last, [N, S, C]): calls
// f(i, c, nc, ng) for each flat offset i of this thread's grid-stride loop, i < N·C·S, with its
// channel c, nc = n·C + c and ng = n·G + (c's group) for its sample n.
template <class F>
__device__ __forceinline__ void for_each_element(const GroupNormShape& s, F&& f) {
  const int64_t total = s.N * s.C * s.S;
  const int64_t R0 = s.channels_last ? s.C : s.S, R1 = s.channels_last ? s.S : s.C;
  const int64_t stride = static_cast<int64_t>(kThreads) * gridDim.x;
  int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= total) return;
  Digits d(i, R1, R0);
  const Digits step(stride, R1, R0);
  const int64_t Cg = s.C / s.G;
  const bool narrow = s.C <= int64_t{UINT32_MAX};
  for (; i < total; i += stride, d.advance(step, R1, R0)) {
    const int64_t n = d.hi, c = s.channels_last ? d.lo : d.mid;
    f(i, c, n * s.C + c, n * s.G + group_of(c, Cg, narrow));
  }
}

// Calls f(offset) for the elements of group g of sample n that thread threadIdx.x takes (every
// kThreads-th of the group's Cg·S elements, in memory order).
template <class F>
__device__ __forceinline__ void for_each_in_group(const GroupNormShape& s, int64_t n, int64_t g,
                                                  F&& f) {
  const int64_t Cg = s.C / s.G, M = Cg * s.S;
  if (!s.channels_last) {  // the group is Cg·S contiguous elements
    const int64_t base = (n * s.C + g * Cg) * s.S;
    for (int64_t i = threadIdx.x; i < M; i += kThreads) f(base + i);
    return;
  }
  // channels-last: element i of the group is (position i / Cg, channel g·Cg + i % Cg)
  int64_t i = threadIdx.x;
  if (i >= M) return;
  Digits d(i, s.S, Cg);
  const Digits step(kThreads, s.S, Cg);
  const int64_t base = n * s.S * s.C + g * Cg;
  for (; i < M; i += kThreads, d.advance(step, s.S, Cg)) f(base + d.mid * s.C + d.lo);
}

// The block's sum of v, returned to every thread (blockDim.x == kThreads).
template <class A>
__device__ A block_sum(A v) {
  __shared__ A shared[kThreads / 32 + 1];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A t = lane < kThreads / 32 ? shared[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) shared[kThreads / 32] = t;
  }
  __syncthreads();
  return shared[kThreads / 32];
}

template <class A>
__device__ __forceinline__ A sigmoid(A h) {
  return A(1) / (A(1) + exp(-h));
}

template <class A>
__device__ __forceinline__ A param(const void* p, int64_t i, A absent) {
  return p ? static_cast<const A*>(p)[i] : absent;
}

template <class T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const GroupNormActFwdParams p) {
  using A = Acc<T>;
  const GroupNormShape& s = p.s;
  const int64_t n = blockIdx.x / s.G, g = blockIdx.x % s.G;
  const int64_t M = (s.C / s.G) * s.S;
  const T* x = static_cast<const T*>(p.x);
  A t = 0;
  for_each_in_group(s, n, g, [&](int64_t off) { t += to_acc(x[off]); });
  const A mu = M > 0 ? block_sum(t) / static_cast<A>(M) : A(0);
  t = 0;
  for_each_in_group(s, n, g, [&](int64_t off) {
    const A d = to_acc(x[off]) - mu;
    t += d * d;
  });
  const A var = M > 0 ? block_sum(t) / static_cast<A>(M) : A(0);
  if (threadIdx.x == 0) {
    static_cast<A*>(p.mean)[blockIdx.x] = mu;
    static_cast<A*>(p.rstd)[blockIdx.x] = gn::rstd_of(var, static_cast<A>(p.eps));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) apply_kernel(const GroupNormActFwdParams p) {
  using A = Acc<T>;
  const GroupNormShape& s = p.s;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  for_each_element(s, [&](int64_t i, int64_t c, int64_t nc, int64_t ng) {
    A alpha, beta;
    gn::affine(rstd[ng], param<A>(p.weight, c, A(1)), param<A>(p.bias, c, A(0)),
               param<A>(p.scale, nc, A(0)), param<A>(p.shift, nc, A(0)), alpha, beta);
    A h = (to_acc(x[i]) - mean[ng]) * alpha + beta;
    if (s.silu) h = gn::silu(h, sigmoid(h));
    y[i] = from_acc<T>(h);
  });
}

// dh of one element, xc = x - mean.
template <class A>
__device__ __forceinline__ A grad_h(A xc, A dy, A alpha, A beta, bool silu) {
  if (!silu) return dy;
  const A h = xc * alpha + beta;
  return gn::silu_grad(dy, h, sigmoid(h), A(1));
}

// Per (n, g) block: A = Σ dh, B = Σ dh·xhat per channel (work[0, NC), work[NC, 2NC)), grad_shift,
// grad_scale, and the group's s1, s2 (work[2NC + 2(n·G + g) + {0, 1}]).
//
// NCHW: a channel's S elements are contiguous; the block sums one channel after another.
// Channels-last with 0 < Cg <= kThreads: a row holds the group's Cg channels side by side, so the
// first (kThreads / Cg)·Cg threads each keep one channel, k = threadIdx.x % Cg, and take every
// (kThreads / Cg)-th row (the warps read whole runs of Cg channels, as the statistics do); the
// per-channel totals are then summed over those threads from shared memory, in thread order.
// (Wider groups take the NCHW loop with the channels-last offsets.)
template <class T>
__global__ void __launch_bounds__(kThreads) channel_sums_kernel(const GroupNormActBwdParams p) {
  using A = Acc<T>;
  const GroupNormShape& s = p.s;
  const int64_t n = blockIdx.x / s.G, g = blockIdx.x % s.G, Cg = s.C / s.G;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const A mean = static_cast<const A*>(p.mean)[blockIdx.x];
  const A rstd = static_cast<const A*>(p.rstd)[blockIdx.x];
  A* work = static_cast<A*>(p.work);
  const int64_t NC = s.N * s.C;
  // Channel c's coefficients and its dh sums over the rows q = q0, q0 + dq, … < S.
  const auto channel_sums = [&](int64_t c, int64_t q0, int64_t dq, A& ta, A& tb) {
    const int64_t nc = n * s.C + c;
    A alpha, beta;
    gn::affine(rstd, param<A>(p.weight, c, A(1)), param<A>(p.bias, c, A(0)),
               param<A>(p.scale, nc, A(0)), param<A>(p.shift, nc, A(0)), alpha, beta);
    ta = 0, tb = 0;
    for (int64_t q = q0; q < s.S; q += dq) {
      const int64_t off = s.channels_last ? (n * s.S + q) * s.C + c : nc * s.S + q;
      const A xc = to_acc(x[off]) - mean;
      const A dh = grad_h(xc, to_acc(dy[off]), alpha, beta, s.silu);
      ta += dh;
      tb += dh * xc * rstd;
    }
  };
  // Channel c's results; its terms of the group's s1, s2 are added to them.
  const auto store = [&](int64_t c, A ta, A tb, A& s1, A& s2) {
    const int64_t nc = n * s.C + c;
    const A w = param<A>(p.weight, c, A(1)), b = param<A>(p.bias, c, A(0));
    const A f = A(1) + param<A>(p.scale, nc, A(0));
    work[nc] = ta;
    work[NC + nc] = tb;
    static_cast<A*>(p.grad_shift)[nc] = ta;
    static_cast<A*>(p.grad_scale)[nc] = w * tb + b * ta;
    s1 += w * f * ta;
    s2 += w * f * tb;
  };
  A s1 = 0, s2 = 0;
  if (s.channels_last && Cg > 0 && Cg <= kThreads) {
    __shared__ A red_a[kThreads], red_b[kThreads];
    const int per_row = kThreads / static_cast<int>(Cg);  // threads per channel
    const int t = threadIdx.x, k = t % static_cast<int>(Cg);
    A ta = 0, tb = 0;
    if (t < per_row * Cg) channel_sums(g * Cg + k, t / static_cast<int>(Cg), per_row, ta, tb);
    red_a[t] = ta;
    red_b[t] = tb;
    __syncthreads();
    if (t == 0) {
      for (int64_t j = 0; j < Cg; ++j) {
        A a = 0, bsum = 0;
        for (int r = 0; r < per_row; ++r) a += red_a[j + r * Cg], bsum += red_b[j + r * Cg];
        store(g * Cg + j, a, bsum, s1, s2);
      }
    }
  } else {
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      A ta, tb;
      channel_sums(c, threadIdx.x, kThreads, ta, tb);
      ta = block_sum(ta);
      tb = block_sum(tb);
      if (threadIdx.x == 0) store(c, ta, tb, s1, s2);
    }
  }
  if (threadIdx.x == 0) {
    work[2 * NC + 2 * blockIdx.x] = s1;
    work[2 * NC + 2 * blockIdx.x + 1] = s2;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) grad_x_kernel(const GroupNormActBwdParams p) {
  using A = Acc<T>;
  const GroupNormShape& s = p.s;
  const int64_t Cg = s.C / s.G, NC = s.N * s.C;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.grad_x);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A* work = static_cast<const A*>(p.work);
  const A inv_m = A(1) / static_cast<A>(Cg * s.S);
  for_each_element(s, [&](int64_t i, int64_t c, int64_t nc, int64_t ng) {
    const A w = param<A>(p.weight, c, A(1)), sc = param<A>(p.scale, nc, A(0));
    A alpha, beta, cp, cq, cr;
    gn::affine(rstd[ng], w, param<A>(p.bias, c, A(0)), sc, param<A>(p.shift, nc, A(0)), alpha,
               beta);
    gn::dx_coefs(rstd[ng], w * (A(1) + sc), work[2 * NC + 2 * ng], work[2 * NC + 2 * ng + 1], inv_m,
                 cp, cq, cr);
    const A xc = to_acc(x[i]) - mean[ng];
    dx[i] = from_acc<T>(grad_h(xc, to_acc(dy[i]), alpha, beta, s.silu) * cp + xc * cq + cr);
  });
}

template <class A>
__global__ void __launch_bounds__(kThreads) param_grads_kernel(const GroupNormActBwdParams p) {
  const GroupNormShape& s = p.s;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (c >= s.C) return;
  const A* work = static_cast<const A*>(p.work);
  const int64_t NC = s.N * s.C;
  A gw = 0, gb = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t nc = n * s.C + c;
    const A f = A(1) + param<A>(p.scale, nc, A(0));
    gb += f * work[nc];
    gw += f * work[NC + nc];
  }
  static_cast<A*>(p.grad_weight)[c] = gw;
  static_cast<A*>(p.grad_bias)[c] = gb;
}

}  // namespace iddpm::cuda::gn_kernels

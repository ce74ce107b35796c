// csrc/cuda/attention_bwd_kernel.cuh — backward kernels of the fused QKV attention (CUDA C++17,
// no torch); launched by attention_bwd.cu, also compiled for the host by the emulation test
// (tests/ops/cuda_emulation/).
//
// FlashAttention-2's scheme, on the [C, T] layout of qkv, recomputing P (no T×T matrix):
//  1. attn_delta_kernel: D_i = Σ_c dO[c, i]·O[c, i] per (b·h, query), in fp32.
//  2. attn_bwd_kernel: one CTA of 4 warps per (b·h, tile of BK = 64 keys); warp w owns key
//     rows 16w..16w+15 and keeps dkᵀ, dvᵀ (16 × C) in fp32 registers. For each tile of BQ
//     queries (two-stage cp.async pipeline for q, dO, lse, D):
//       Sᵀ  = kᵀq,  dPᵀ = vᵀdO                     (16 keys × BQ queries per warp)
//       Pᵀ  = exp2(Sᵀ·scale·log2e - lse·log2e),  dSᵀ = Pᵀ ∘ (dPᵀ - D)   (zero outside T)
//       dvᵀ += Pᵀ dOᵀ,  dkᵀ += dSᵀ qᵀ               (Pᵀ, dSᵀ reused in registers as A fragments)
//       dSᵀ → shared memory; dqᵀ (BQ × C) = dS kᵀ over the CTA's 64 keys, added to an fp32
//       [BH, C, T] buffer with atomicAdd.
//     Atomics for dq (rather than a second pass that recomputes S and dP per query tile) keep
//     the work at 5 products per (query, key) pair instead of 7; the price is that dq's fp32
//     sums are not bitwise deterministic from run to run.
//  3. attn_dq_kernel: grad_q = scale · dq_accum, cast, into grad_qkv's q channels.
// fp32 products run as TF32 or split-TF32 (P, see attention_common.cuh); under kTf32 the k, v,
// q, dO tiles are rounded to TF32 in shared memory as they land (round_tile), and Pᵀ, dSᵀ as
// they become A fragments or go to shared memory.
// dk (× scale) and dv go straight to grad_qkv's k, v channels through a shared-memory staging
// tile, so grad_qkv is written exactly once everywhere.
#pragma once

#include "cuda/attention_common.cuh"

#if !defined(IDDPM_ATTN_HOST_EMULATION)
#include <algorithm>

#include "common/attention_params.h"
#endif

namespace iddpm::cuda::attn_kernels {

using namespace attn_dev;

template <class T, int Cp>
struct BwdCfg : CtaShape {
  static constexpr int BK = 16 * kWarps;  // keys per CTA
  // Queries per step (register budget; at Cp = 256 in fp32 also the shared-memory one).
  static constexpr int BQ = Cp < 128 ? 64 : (Cp == 256 && sizeof(T) == 4 ? 16 : 32);
  // Channels of dk, dv, dq a CTA accumulates: all of them up to 128; at Cp = 256 each CTA
  // takes one half (gridDim.z = 2), recomputing Sᵀ and dPᵀ over all channels (7 products per
  // (query, key) pair instead of 5, with the register budget of Cp = 128).
  static constexpr int CA = Cp < 128 ? Cp : 128;
  static constexpr int LDK = BK + kPad<T>, LDQ = BQ + kPad<T>;
  // k, v: [Cp, LDK]; q, dO: 2 stages × [Cp, LDQ]; dSᵀ: [BK, LDQ]; then lse2, D: 2 × [BQ] f32.
  static constexpr int kElems = 2 * Cp * LDK + 4 * Cp * LDQ + BK * LDQ;
  static constexpr size_t kSmemBytes = kElems * sizeof(T) + 4 * BQ * sizeof(float);
  static_assert(kSmemBytes <= kMaxSmemBytes, "backward shared memory over the per-block limit");
  // dq: the BQ × CA tile is split over the 4 warps as RB row blocks × CS column blocks.
  static constexpr int RB = BQ / 16, CS = kWarps / RB, CW = CA / CS;
  static_assert(RB * CS == kWarps && CW % 16 == 0, "dq tiling");
  static_assert(Cp % CA == 0 && CA % 16 == 0, "channel slices");
  // CTAs per SM the register budget aims at (__launch_bounds__): 3 at Cp = 32 (the fp16/bf16
  // kernel needs about 170 registers; left alone, ptxas takes a few more and fits only 2).
  static constexpr int kMinBlocks = Cp == 32 ? 3 : 1;
  // The dk, dv staging tiles [CA, LDK] reuse the two q/dO regions.
  static_assert(CA * LDK <= 2 * Cp * LDQ, "staging space");
};

// dout, out: [BH, C, T]; delta: [BH, T]. Block b covers (bh = b / tiles, 128 queries).
template <class T>
__global__ void attn_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                  float* __restrict__ delta, int C, int T_len, int tiles) {
  const int64_t bh = blockIdx.x / tiles;
  const int i = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (i >= T_len) return;
  const int64_t base = bh * C * static_cast<int64_t>(T_len) + i;
  float acc = 0.0f;
#pragma unroll 8
  for (int c = 0; c < C; ++c) {
    acc = fmaf(Elem<T>::to_f(dout[base + c * static_cast<int64_t>(T_len)]),
               Elem<T>::to_f(out[base + c * static_cast<int64_t>(T_len)]), acc);
  }
  delta[bh * T_len + i] = acc;
}

// grad_qkv q channels = scale · dq_accum. dq_accum: [BH, C, T]; grad_qkv: [BH, 3C, T].
template <class T>
__global__ void attn_dq_kernel(const float* __restrict__ dq, T* __restrict__ grad_qkv, int64_t BH,
                               int C, int T_len, float scale) {
  const int64_t n = BH * C * static_cast<int64_t>(T_len);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t bh = idx / (C * static_cast<int64_t>(T_len));
    const int64_t rest = idx - bh * C * T_len;  // c·T + i
    grad_qkv[bh * 3 * C * T_len + rest] = Elem<T>::from_f(dq[idx] * scale);
  }
}

// Block (bh, key tile, channel slice z): dk, dv, dq over channels [CA·z, CA·z + CA) ∩ [0, C).
template <class T, int Cp, Prec P = Elem<T>::kTensorCore ? Prec::kNative : Prec::kFma,
          bool kTileMajor = false>
__global__ void __launch_bounds__(CtaShape::kThreads, BwdCfg<T, Cp>::kMinBlocks)
    attn_bwd_kernel(const T* __restrict__ qkv, const T* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ grad_qkv, float* __restrict__ dq_accum, int C, int T_len,
                    float scale, float scale_log2, bool vec) {
#if IDDPM_ATTN_SM80_CODE
  using Cfg = BwdCfg<T, Cp>;
  constexpr int BK = Cfg::BK, BQ = Cfg::BQ, LDK = Cfg::LDK, LDQ = Cfg::LDQ, NT = Cfg::kThreads;
  constexpr int CA = Cfg::CA;
  constexpr int KSTEP_C = Cp / 16, NTILE_A = CA / 8, NTILE_Q = BQ / 8, KSTEP_Q = BQ / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);                    // [Cp, LDK]
  T* vs = ks + Cp * LDK;                                     // [Cp, LDK]
  T* qs = vs + Cp * LDK;                                     // 2 × [Cp, LDQ]
  T* dos = qs + 2 * Cp * LDQ;                                // 2 × [Cp, LDQ]
  T* dss = dos + 2 * Cp * LDQ;                               // [BK, LDQ]: dSᵀ[j, i]
  float* lse2_s = reinterpret_cast<float*>(dss + BK * LDQ);  // 2 × [BQ]
  float* delta_s = lse2_s + 2 * BQ;                          // 2 × [BQ]

  // grid [B·H, key tiles, slices], or with kTileMajor [key tiles, B·H, slices]
  const int64_t bh = kTileMajor ? blockIdx.y : blockIdx.x;
  const int j0 = (kTileMajor ? blockIdx.x : blockIdx.y) * BK;
  const int cs0 = Cp == CA ? 0 : blockIdx.z * CA;  // this CTA's channel slice
  const int64_t TT = T_len;
  const T* qg = qkv + bh * 3 * C * TT;
  const T* kg = qg + C * TT;
  const T* vg = kg + C * TT;
  const T* dog = dout + bh * C * TT;
  const float* lse_g = lse + bh * TT;
  const float* delta_g = delta + bh * TT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  auto load_q_tile = [&](int stage, int i0) {
    load_tile<T, Cp, BQ, LDQ, NT>(qs + stage * Cp * LDQ, C, qg, TT, i0, T_len, vec);
    load_tile<T, Cp, BQ, LDQ, NT>(dos + stage * Cp * LDQ, C, dog, TT, i0, T_len, vec);
    for (int i = threadIdx.x; i < BQ; i += NT) {  // padded queries: lse2 = D = 0 (masked anyway)
      const bool valid = i0 + i < T_len;
      lse2_s[stage * BQ + i] = valid ? attn::lse_to_base2(lse_g[i0 + i]) : 0.0f;
      delta_s[stage * BQ + i] = valid ? delta_g[i0 + i] : 0.0f;
    }
  };

  auto round_q_tile = [&](int stage) {  // after this thread's cp_async_wait_all (kTf32 only)
    round_tile<P, T, Cp, BQ, LDQ, NT>(qs + stage * Cp * LDQ, vec);
    round_tile<P, T, Cp, BQ, LDQ, NT>(dos + stage * Cp * LDQ, vec);
  };

  // Channels C..Cp-1 of every tile are zero (load_tile): Sᵀ and dPᵀ are exact; dk, dv and dq
  // there are never stored.
  load_tile<T, Cp, BK, LDK, NT>(ks, C, kg, TT, j0, T_len, vec);
  load_tile<T, Cp, BK, LDK, NT>(vs, C, vg, TT, j0, T_len, vec);
  load_q_tile(0, 0);
  cp_async_wait_all();
  round_tile<P, T, Cp, BK, LDK, NT>(ks, vec);
  round_tile<P, T, Cp, BK, LDK, NT>(vs, vec);
  round_q_tile(0);
  __syncthreads();

  float dk[NTILE_A][4], dv[NTILE_A][4];
  zero_tiles(dk);
  zero_tiles(dv);

  const int n_tiles = (T_len + BQ - 1) / BQ;
  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1, i0 = it * BQ;
    if (it + 1 < n_tiles) load_q_tile(buf ^ 1, i0 + BQ);
    const T* qb = qs + buf * Cp * LDQ;
    const T* dob = dos + buf * Cp * LDQ;
    const float* l2b = lse2_s + buf * BQ;
    const float* db = delta_s + buf * BQ;

    // Sᵀ = kᵀq and dPᵀ = vᵀdO for this warp's 16 keys × BQ queries (over all Cp channels).
    float st[NTILE_Q][4], dpt[NTILE_Q][4];
    zero_tiles(st);
    zero_tiles(dpt);
#pragma unroll
    for (int kk = 0; kk < KSTEP_C; ++kk) {
      FragA<T> ka, va;
      load_a_kmajor(ka, ks, LDK, 16 * warp, 16 * kk);
      load_a_kmajor(va, vs, LDK, 16 * warp, 16 * kk);
#pragma unroll
      for (int n = 0; n < NTILE_Q; n += 2) {
        mma_pair<Major::k, P>(st[n], st[n + 1], ka, qb, LDQ, 16 * kk, 8 * n);
        mma_pair<Major::k, P>(dpt[n], dpt[n + 1], va, dob, LDQ, 16 * kk, 8 * n);
      }
    }
    // Pᵀ and dSᵀ in place; zero outside the T × T square. dSᵀ also to shared memory.
#pragma unroll
    for (int n = 0; n < NTILE_Q; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = 8 * n + 2 * t + (e & 1);
        const int j = j0 + 16 * warp + g + 8 * (e >> 1);
        const bool valid = j < T_len && i0 + il < T_len;
        const float p =
            valid ? attn::recomputed_prob(st[n][e] * scale_log2, l2b[il], Exp2{}) : 0.0f;
        st[n][e] = p;
        dpt[n][e] = attn::logit_grad(p, dpt[n][e], db[il]);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int jl = 16 * warp + g + 8 * r, il = 8 * n + 2 * t;
        *reinterpret_cast<typename Elem<T>::Pair*>(dss + jl * LDQ + il) =
            pack_operand<P, T>(dpt[n][2 * r], dpt[n][2 * r + 1]);
      }
    }
    // dvᵀ += Pᵀ dOᵀ and dkᵀ += dSᵀ qᵀ over the slice's channels: B[k = query][n = channel]
    // from the [Cp, BQ] tiles.
#pragma unroll
    for (int ki = 0; ki < KSTEP_Q; ++ki) {
      FragA<T> pa, sa;
      c_to_a<P>(pa, st[2 * ki], st[2 * ki + 1]);
      c_to_a<P>(sa, dpt[2 * ki], dpt[2 * ki + 1]);
#pragma unroll
      for (int n = 0; n < NTILE_A; n += 2) {
        mma_pair<Major::n, P>(dv[n], dv[n + 1], pa, dob, LDQ, 16 * ki, cs0 + 8 * n);
        mma_pair<Major::n, P>(dk[n], dk[n + 1], sa, qb, LDQ, 16 * ki, cs0 + 8 * n);
      }
    }
    __syncthreads();  // dSᵀ of all 64 keys is in shared memory

    // dqᵀ[i, c] = Σ_j dS[i, j] k[c, j]: warp → query rows 16·(w % RB).., channels
    // cs0 + CW·(w / RB)..
    {
      constexpr int CW = Cfg::CW, NTILE_W = CW / 8;
      const int rb = warp % Cfg::RB, c0 = cs0 + (warp / Cfg::RB) * CW;
      float dq[NTILE_W][4];
      zero_tiles(dq);
#pragma unroll
      for (int kj = 0; kj < BK / 16; ++kj) {
        FragA<T> a;
        load_a_kmajor(a, dss, LDQ, 16 * rb, 16 * kj);
#pragma unroll
        for (int n = 0; n < NTILE_W; n += 2) {
          mma_pair<Major::n, P>(dq[n], dq[n + 1], a, ks, LDK, 16 * kj, c0 + 8 * n);
        }
      }
      float* dqg = dq_accum + bh * C * TT;
#pragma unroll
      for (int n = 0; n < NTILE_W; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + 16 * rb + g + 8 * (e >> 1), c = c0 + 8 * n + 2 * t + (e & 1);
          if (i < T_len && c < C) atomicAdd(dqg + c * TT + i, dq[n][e]);
        }
      }
    }
    cp_async_wait_all();
    if (it + 1 < n_tiles) round_q_tile(buf ^ 1);
    __syncthreads();  // next stage landed; dSᵀ and this stage free for reuse
  }

  // dk (× scale: the logits are scale·qᵀk) and dv of the slice, staged as [CA, BK] in the
  // q / dO regions; channels >= C are not stored.
  T* dks = qs;
  T* dvs = dos;
#pragma unroll
  for (int n = 0; n < NTILE_A; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = 8 * n + 2 * t + (e & 1), jl = 16 * warp + g + 8 * (e >> 1);
      dks[c * LDK + jl] = Elem<T>::from_f(dk[n][e] * scale);
      dvs[c * LDK + jl] = Elem<T>::from_f(dv[n][e]);
    }
  }
  __syncthreads();
  const int rows = C - cs0 < CA ? C - cs0 : CA;
  T* gk = grad_qkv + bh * 3 * C * TT + (C + cs0) * TT;
  store_tile<T, CA, BK, LDK, NT>(gk, TT, dks, rows, j0, T_len);
  store_tile<T, CA, BK, LDK, NT>(gk + C * TT, TT, dvs, rows, j0, T_len);
#elif defined(__CUDA_ARCH__)
  __trap();  // as attn_fwd_kernel
#endif
}

#if !defined(IDDPM_ATTN_HOST_EMULATION)
// Host side, shared by the sm_80 and the sm_90a backward launchers (attention_bwd.cu,
// attention_bwd_sm90.cu): what runs before and after their main kernel. Each returns a
// cudaError_t value.

// Zeroes dq_accum and computes D (attn_delta_kernel, one block per (b·h, 128 queries)).
template <class T>
int launch_bwd_prologue(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t BH = p.s.B * p.s.H, T_len = p.s.T;
  const int tiles = static_cast<int>((T_len + 127) / 128);
  // gridDim.x <= 2^31 - 1 (the glue keeps B·H within it; B·H·tiles needs far more memory).
  if (BH > int64_t{2147483647} / tiles) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaError_t err =
      cudaMemsetAsync(p.dq_accum, 0, BH * p.s.C * T_len * sizeof(float), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  attn_delta_kernel<T><<<static_cast<unsigned>(BH * tiles), 128, 0, stream>>>(
      static_cast<const T*>(p.grad_out), static_cast<const T*>(p.out), p.delta,
      static_cast<int>(p.s.C), static_cast<int>(T_len), tiles);
  return 0;
}

// grad_qkv's q channels from dq_accum (attn_dq_kernel, grid-stride).
template <class T>
int launch_bwd_epilogue(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t BH = p.s.B * p.s.H, n = BH * p.s.C * p.s.T;
  const int C = static_cast<int>(p.s.C);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535 * 8));
  attn_dq_kernel<T><<<blocks, 256, 0, stream>>>(p.dq_accum, static_cast<T*>(p.grad_qkv), BH, C,
                                                static_cast<int>(p.s.T),
                                                attn::softmax_scale<float>(C));
  return static_cast<int>(cudaGetLastError());
}
#endif

}  // namespace iddpm::cuda::attn_kernels

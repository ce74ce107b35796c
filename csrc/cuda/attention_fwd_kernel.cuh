// csrc/cuda/attention_fwd_kernel.cuh — forward kernel of the fused QKV attention (CUDA C++17, no
// torch); launched by attention_fwd.cu, also compiled for the host by the emulation test
// (tests/ops/cuda_emulation/).
//
// Compiled per tile width Cp (kAttentionTileDims); the head dim C <= Cp is a run-time argument
// (channels C..Cp-1 of the tiles are zero). One CTA of 4 warps per (b·h, tile of BQ = 64
// queries); warp w owns query rows 16w..16w+15. The q tile is read once into registers as A
// fragments (ldmatrix.trans straight from the [C, T] layout; at Cp = 256 it stays in shared
// memory and is read per product); the kernel then streams key/value tiles of BK = 64 (32 at
// Cp = 256) through a two-stage shared-memory pipeline (cp.async), and per tile:
//   S  = qᵀk            16×BK per warp, fp32 accumulators in registers
//   s2 = S · scale·log2e, keys ≥ T set to -inf
//   online softmax       row max over the quad, rescale of l and O by exp2(m_old - m_new)
//   O += P v            P converted in registers from the S accumulators to A fragments
// fp32 products run as TF32 or split-TF32 (P, see attention_common.cuh); under kTf32 the q, k,
// v tiles are rounded to TF32 in shared memory as they land (round_tile) and P as it becomes an
// A fragment. At the end O / l is staged through shared memory (as [C, BQ]) and written with
// coalesced stores along T; lse = (m + log2 l)·ln2 goes to [B, H, T]. Rows ≥ T are computed on
// zeros and never stored. No T×T matrix exists anywhere.
#pragma once

#include "cuda/attention_common.cuh"

namespace iddpm::cuda::attn_kernels {

using namespace attn_dev;

template <class T, int Cp>
struct FwdCfg : CtaShape {
  // Cp = 256: key tiles of 32 (the S accumulators and the smem stages halve) and q fragments
  // reloaded from shared memory per product (kept in registers they would take 64 of them,
  // next to the 128 of the O accumulators).
  static constexpr int BQ = 16 * kWarps, BK = Cp == 256 ? 32 : 64;
  static constexpr bool kQInRegs = Cp <= 128;
  static constexpr int LDQ = BQ + kPad<T>, LDK = BK + kPad<T>;
  static constexpr int kSmemElems = Cp * LDQ + 4 * Cp * LDK;  // q, then 2 stages of (k, v)
  static constexpr size_t kSmemBytes = kSmemElems * sizeof(T);
  static_assert(kSmemBytes <= kMaxSmemBytes, "forward shared memory over the per-block limit");
  static_assert(Cp % 16 == 0 && BK % 16 == 0, "whole 16×16 blocks");
};

// qkv: [BH, 3C, T] (per head q | k | v, each [C, T]); out: [BH, C, T]; lse: [BH, T]. C <= Cp:
// channels C..Cp-1 of the q, k, v tiles are zero (so the products over channels are exact) and
// those of O are never stored.
template <class T, int Cp, Prec P = Elem<T>::kTensorCore ? Prec::kNative : Prec::kFma,
          bool kTileMajor = false>
__global__ void __launch_bounds__(CtaShape::kThreads)
    attn_fwd_kernel(const T* __restrict__ qkv, T* __restrict__ out, float* __restrict__ lse, int C,
                    int T_len, float scale_log2, bool vec) {
#if IDDPM_ATTN_SM80_CODE
  using Cfg = FwdCfg<T, Cp>;
  constexpr int BQ = Cfg::BQ, BK = Cfg::BK, LDQ = Cfg::LDQ, LDK = Cfg::LDK, NT = Cfg::kThreads;
  constexpr int NTILE_K = BK / 8, KSTEP_C = Cp / 16, NTILE_C = Cp / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);  // [Cp, LDQ]
  T* ks = qs + Cp * LDQ;                   // 2 × [Cp, LDK]
  T* vs = ks + 2 * Cp * LDK;               // 2 × [Cp, LDK]

  // grid [B·H, query tiles], or with kTileMajor [query tiles, B·H] (a head's tiles adjacent in
  // launch order; its own instance, so the default kernel's code is what it was)
  const int64_t bh = kTileMajor ? blockIdx.y : blockIdx.x;
  const int q0 = (kTileMajor ? blockIdx.x : blockIdx.y) * BQ;
  const T* qg = qkv + bh * 3 * C * static_cast<int64_t>(T_len);
  const T* kg = qg + C * static_cast<int64_t>(T_len);
  const T* vg = kg + C * static_cast<int64_t>(T_len);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  // Channels C..Cp-1 of every tile are zero (load_tile): S = qᵀk is exact, O's are never stored.
  load_tile<T, Cp, BQ, LDQ, NT>(qs, C, qg, T_len, q0, T_len, vec);
  load_tile<T, Cp, BK, LDK, NT>(ks, C, kg, T_len, 0, T_len, vec);
  load_tile<T, Cp, BK, LDK, NT>(vs, C, vg, T_len, 0, T_len, vec);
  cp_async_wait_all();
  round_tile<P, T, Cp, BQ, LDQ, NT>(qs, vec);
  round_tile<P, T, Cp, BK, LDK, NT>(ks, vec);
  round_tile<P, T, Cp, BK, LDK, NT>(vs, vec);
  __syncthreads();

  // Split-TF32 at Cp = 128 reads q per product too: with q's fp32 fragments in registers (64)
  // next to its operand splits ptxas spilled 352 bytes.
  constexpr bool kQInRegs = Cfg::kQInRegs && !(P == Prec::kTf32x3 && Cp == 128);
  FragA<T> qf[kQInRegs ? KSTEP_C : 1];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KSTEP_C; ++kk) load_a_kmajor(qf[kk], qs, LDQ, 16 * warp, 16 * kk);
  }

  float o[NTILE_C][4];
  zero_tiles(o);
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};  // rows g, g + 8

  const int n_tiles = (T_len + BK - 1) / BK;
  for (int kt = 0; kt < n_tiles; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < n_tiles) {  // prefetch the next k, v tile into the other stage
      load_tile<T, Cp, BK, LDK, NT>(ks + (buf ^ 1) * Cp * LDK, C, kg, T_len, (kt + 1) * BK, T_len,
                                    vec);
      load_tile<T, Cp, BK, LDK, NT>(vs + (buf ^ 1) * Cp * LDK, C, vg, T_len, (kt + 1) * BK, T_len,
                                    vec);
    }
    const T* kb = ks + buf * Cp * LDK;
    const T* vb = vs + buf * Cp * LDK;

    float s[NTILE_K][4];
    zero_tiles(s);
#pragma unroll
    for (int kk = 0; kk < KSTEP_C; ++kk) {
      if constexpr (kQInRegs) {
#pragma unroll
        for (int n = 0; n < NTILE_K; n += 2) {
          mma_pair<Major::k, P>(s[n], s[n + 1], qf[kk], kb, LDK, 16 * kk, 8 * n);
        }
      } else {
        FragA<T> qa;
        load_a_kmajor(qa, qs, LDQ, 16 * warp, 16 * kk);
#pragma unroll
        for (int n = 0; n < NTILE_K; n += 2) {
          mma_pair<Major::k, P>(s[n], s[n + 1], qa, kb, LDK, 16 * kk, 8 * n);
        }
      }
    }
    // Base-2 logits, keys past T masked; row max over the tile (quad reduction).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NTILE_K; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = kt * BK + 8 * n + 2 * t + (e & 1);
        const float v = j < T_len ? s[n][e] * scale_log2 : -INFINITY;
        s[n][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_row[r] = attn::online_max_update(m_row[r], quad_max(mx[r]), &alpha[r], Max{}, Exp2{});
    }
#pragma unroll
    for (int n = 0; n < NTILE_K; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = attn::online_prob(s[n][e], m_row[e >> 1], Exp2{});
        s[n][e] = p;
        sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_row[r] = attn::online_sum_update(l_row[r], alpha[r], sum[r]);
#pragma unroll
    for (int n = 0; n < NTILE_C; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e >> 1];
    }

    // O += P · vᵀ: A = P (16 queries × 16 keys), B[k = key][n = channel] = v[c, j].
#pragma unroll
    for (int kj = 0; kj < BK / 16; ++kj) {
      FragA<T> pf;
      c_to_a<P>(pf, s[2 * kj], s[2 * kj + 1]);
#pragma unroll
      for (int n = 0; n < NTILE_C; n += 2) {
        mma_pair<Major::n, P>(o[n], o[n + 1], pf, vb, LDK, 16 * kj, 8 * n);
      }
    }
    cp_async_wait_all();
    if (kt + 1 < n_tiles) {
      round_tile<P, T, Cp, BK, LDK, NT>(ks + (buf ^ 1) * Cp * LDK, vec);
      round_tile<P, T, Cp, BK, LDK, NT>(vs + (buf ^ 1) * Cp * LDK, vec);
    }
    __syncthreads();
  }

  // l is a per-lane partial sum over the lane's columns: complete it over the quad.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    inv_l[r] = 1.0f / l;
    const int i = q0 + 16 * warp + g + 8 * r;
    if (t == 0 && i < T_len) lse[bh * T_len + i] = attn::row_lse(m_row[r], l, Log2{});
  }
  // Stage O / l as [Cp, BQ] in the q buffer (free: every warp passed the loop's last barrier
  // after its last read of q).
  T* os = qs;
#pragma unroll
  for (int n = 0; n < NTILE_C; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = 8 * n + 2 * t + (e & 1), i = 16 * warp + g + 8 * (e >> 1);
      os[c * LDQ + i] = Elem<T>::from_f(o[n][e] * inv_l[e >> 1]);
    }
  }
  __syncthreads();
  store_tile<T, Cp, BQ, LDQ, NT>(out + bh * C * static_cast<int64_t>(T_len), T_len, os, C, q0,
                                 T_len);
#elif defined(__CUDA_ARCH__)
  __trap();  // code for < sm_80 is never launched: qkv_attention_kernel_arch refuses it
#endif
}

}  // namespace iddpm::cuda::attn_kernels

// csrc/cuda/attention_fwd_kernel.cuh — forward kernel of the fused QKV attention (CUDA C++17, no
// torch); launched by attention_fwd.cu, also compiled for the host by the emulation test
// (tests/ops/cuda_emulation/).
//
// One CTA of 4 warps per (b·h, tile of BQ = 64 queries); warp w owns query rows 16w..16w+15.
// The q tile is read once into registers as A fragments (ldmatrix.trans straight from the
// [C, T] layout); the kernel then streams key/value tiles of BK = 64 through a two-stage
// shared-memory pipeline (cp.async), and per tile:
//   S  = qᵀk            16×64 per warp, fp32 accumulators in registers
//   s2 = S · scale·log2e, keys ≥ T set to -inf
//   online softmax       row max over the quad, rescale of l and O by exp2(m_old - m_new)
//   O += P v            P converted in registers from the S accumulators to A fragments
// At the end O / l is staged through shared memory (as [C, BQ]) and written with coalesced
// stores along T; lse = (m + log2 l)·ln2 goes to [B, H, T]. Rows ≥ T are computed on zeros and
// never stored. No T×T matrix exists anywhere.
#pragma once

#include "cuda/attention_common.cuh"

namespace iddpm::cuda::attn_kernels {

using namespace attn_dev;

template <class T, int C>
struct FwdCfg : CtaShape {
  static constexpr int BQ = 16 * kWarps, BK = 64;
  static constexpr int LDQ = BQ + kPad<T>, LDK = BK + kPad<T>;
  static constexpr int kSmemElems = C * LDQ + 4 * C * LDK;  // q, then 2 stages of (k, v)
  static constexpr size_t kSmemBytes = kSmemElems * sizeof(T);
};

// qkv: [BH, 3C, T] (per head q | k | v, each [C, T]); out: [BH, C, T]; lse: [BH, T].
template <class T, int C>
__global__ void __launch_bounds__(CtaShape::kThreads)
    attn_fwd_kernel(const T* __restrict__ qkv, T* __restrict__ out, float* __restrict__ lse,
                    int T_len, float scale_log2, bool vec) {
  using Cfg = FwdCfg<T, C>;
  constexpr int BQ = Cfg::BQ, BK = Cfg::BK, LDQ = Cfg::LDQ, LDK = Cfg::LDK, NT = Cfg::kThreads;
  constexpr int NTILE_K = BK / 8, KSTEP_C = C / 16, NTILE_C = C / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);  // [C, LDQ]
  T* ks = qs + C * LDQ;                    // 2 × [C, LDK]
  T* vs = ks + 2 * C * LDK;                // 2 × [C, LDK]

  const int64_t bh = blockIdx.x;
  const int q0 = blockIdx.y * BQ;
  const T* qg = qkv + bh * 3 * C * static_cast<int64_t>(T_len);
  const T* kg = qg + C * static_cast<int64_t>(T_len);
  const T* vg = kg + C * static_cast<int64_t>(T_len);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  load_tile<T, C, BQ, LDQ, NT>(qs, qg, T_len, q0, T_len, vec);
  load_tile<T, C, BK, LDK, NT>(ks, kg, T_len, 0, T_len, vec);
  load_tile<T, C, BK, LDK, NT>(vs, vg, T_len, 0, T_len, vec);
  cp_async_wait_all();
  __syncthreads();

  FragA<T> qf[KSTEP_C];
#pragma unroll
  for (int kk = 0; kk < KSTEP_C; ++kk) load_a_kmajor(qf[kk], qs, LDQ, 16 * warp, 16 * kk);

  float o[NTILE_C][4];
  zero_tiles(o);
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};  // rows g, g + 8

  const int n_tiles = (T_len + BK - 1) / BK;
  for (int kt = 0; kt < n_tiles; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < n_tiles) {  // prefetch the next k, v tile into the other stage
      load_tile<T, C, BK, LDK, NT>(ks + (buf ^ 1) * C * LDK, kg, T_len, (kt + 1) * BK, T_len, vec);
      load_tile<T, C, BK, LDK, NT>(vs + (buf ^ 1) * C * LDK, vg, T_len, (kt + 1) * BK, T_len, vec);
    }
    const T* kb = ks + buf * C * LDK;
    const T* vb = vs + buf * C * LDK;

    float s[NTILE_K][4];
    zero_tiles(s);
#pragma unroll
    for (int kk = 0; kk < KSTEP_C; ++kk) {
#pragma unroll
      for (int n = 0; n < NTILE_K; n += 2) {
        mma_pair<Major::k>(s[n], s[n + 1], qf[kk], kb, LDK, 16 * kk, 8 * n);
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
      c_to_a(pf, s[2 * kj], s[2 * kj + 1]);
#pragma unroll
      for (int n = 0; n < NTILE_C; n += 2) {
        mma_pair<Major::n>(o[n], o[n + 1], pf, vb, LDK, 16 * kj, 8 * n);
      }
    }
    cp_async_wait_all();
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
  // Stage O / l as [C, BQ] in the q buffer (free since the fragments were loaded).
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
  store_tile<T, C, BQ, LDQ, NT>(out + bh * C * static_cast<int64_t>(T_len), T_len, os, q0, T_len);
}

}  // namespace iddpm::cuda::attn_kernels

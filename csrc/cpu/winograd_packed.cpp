// csrc/cpu/winograd_packed.cpp — the GEMMs and output transform of the bf16 Winograd convolution
// on a packed weight (common/winograd_params.h), as AVX512-BF16 VDPBF16PS pair dot products into
// float32. The kernel is compiled for AVX-512 F/BW/VL/DQ + BF16 by a target pragma around it (the
// rest of the file for the baseline); csrc/ops/winograd.cpp calls it only where
// winograd_packed_supported(). No ATen here (its inline functions must not be compiled with those
// flags): the caller runs the input transform and the threads.
//
// Per column block of 32 output channels and point k: M[k][r, 0:32) = Σ_p dot2(V[k][r, 2p:2p+2),
// U_packed[k][nb][p][0:64)), micro-tiles of kMR rows × 32 columns (2·kMR accumulators, the
// column block's packed U (K/2 × 128 bytes) reused by every row of the block from L1/L2); then
// y = Aᵀ M A + bias (+ residual) in float32 from that scratch, rounded once to bf16.
#include <cstdint>
#include <cstring>

#include "cpu/winograd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define IDDPM_WINO_PACKED 1
#include <immintrin.h>
#endif

namespace iddpm::cpu {

#if defined(IDDPM_WINO_PACKED)

bool winograd_packed_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")

namespace {

constexpr int kMR = 12;  // rows per micro-tile (24 of the 32 vector registers accumulate)

// D[r, 0:32) = Σ_{p<K2} dot2(A[r·lda + 2p], B[p·32 + 0:32)) for r < R; prefetches the panel at
// pf (K2·128 bytes, the next one to run: the weights come from memory, each used for one call)
// into L1 unless it is nullptr.
template <int R>
inline void micro(float* D, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t K2,
                  const uint32_t* pf) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    if (pf != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + p * 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + p * 32 + 16), _MM_HINT_T0);
    }
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + p * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + p * 32 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      uint32_t a;
      std::memcpy(&a, A + r * lda + 2 * p, sizeof a);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a));
      c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(D + r * 32, c0[r]);
    _mm512_storeu_ps(D + r * 32 + 16, c1[r]);
  }
}

template <int R = kMR - 1>
inline void micro_tail(int rem, float* D, const uint16_t* A, int64_t lda, const uint32_t* B,
                       int64_t K2, const uint32_t* pf) {
  if constexpr (R > 0) {
    if (rem == R) return micro<R>(D, A, lda, B, K2, pf);
    micro_tail<R - 1>(rem, D, A, lda, B, K2, pf);
  }
}

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// v rounded to nearest even (NaN -> 0x7FC0, as c10::BFloat16 and the other builds).
inline void store_bf16(uint16_t* p, __m512 v) {
  const __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_mask_mov_epi16(r, nan, _mm256_set1_epi16(0x7FC0)));
}

}  // namespace

void winograd_packed_block(const WinogradPackedParams& p, int64_t t0, int64_t t1, const uint16_t* v,
                           float* m) {
  const int64_t rows = t1 - t0, Cin = p.Cin, Cout = p.Cout, K2 = Cin / 2;
  const int64_t NB = Cout / kWinogradPackCols;
  const int64_t H = p.H, W = p.W, TH = winograd_tiles(H), TW = winograd_tiles(W);
  const uint32_t* up = static_cast<const uint32_t*>(p.u_packed);
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  const uint16_t* res = static_cast<const uint16_t*>(p.residual);
  uint16_t* y = static_cast<uint16_t*>(p.y);
  for (int64_t nb = 0; nb < NB; ++nb) {
    for (int64_t k = 0; k < kWinogradPoints; ++k) {
      const uint32_t* B = up + (k * NB + nb) * K2 * 32;
      // The next panel: point k + 1 of this column block, or point 0 of the next one.
      const int64_t next = k + 1 < kWinogradPoints ? (k + 1) * NB + nb : nb + 1;
      const uint32_t* pf = next < kWinogradPoints * NB ? up + next * K2 * 32 : nullptr;
      const uint16_t* A = v + k * rows * Cin;
      float* D = m + k * rows * 32;
      int64_t r = 0;
      for (; r + kMR <= rows; r += kMR) {
        micro<kMR>(D + r * 32, A + r * Cin, Cin, B, K2, r == 0 ? pf : nullptr);
      }
      if (r < rows) {
        micro_tail(static_cast<int>(rows - r), D + r * 32, A + r * Cin, Cin, B, K2,
                   r == 0 ? pf : nullptr);
      }
    }
    // Output transform of the column block (the sums in csrc/cpu/winograd_kernel.inc's order).
    const int64_t c0 = nb * kWinogradPackCols;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = t0 + i;
      const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      const int64_t h0 = 2 * ty, w0 = 2 * tx;
      const bool h1_in = h0 + 1 < H, w1_in = w0 + 1 < W;
      const int64_t base = ((n * H + h0) * W + w0) * Cout + c0;
      for (int half = 0; half < 2; ++half) {
        const float* q = m + i * 32 + half * 16;
        __m512 s0[4], s1[4];
        for (int j = 0; j < 4; ++j) {
          const __m512 m0 = _mm512_loadu_ps(q + (j)*rows * 32);
          const __m512 m1 = _mm512_loadu_ps(q + (4 + j) * rows * 32);
          const __m512 m2 = _mm512_loadu_ps(q + (8 + j) * rows * 32);
          const __m512 m3 = _mm512_loadu_ps(q + (12 + j) * rows * 32);
          s0[j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
          s1[j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        const __m512 b = bias ? load_bf16(bias + c0 + half * 16) : _mm512_setzero_ps();
        __m512 out[2][2];
        out[0][0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]), b);
        out[0][1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]), b);
        out[1][0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]), b);
        out[1][1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]), b);
        for (int a = 0; a < 2; ++a) {
          if (a == 1 && !h1_in) break;
          for (int e = 0; e < 2; ++e) {
            if (e == 1 && !w1_in) break;
            const int64_t off = base + (a * W + e) * Cout + half * 16;
            __m512 o = out[a][e];
            if (res != nullptr) o = _mm512_add_ps(o, load_bf16(res + off));
            store_bf16(y + off, o);
          }
        }
      }
    }
  }
}

#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never selected

bool winograd_packed_supported() { return false; }

void winograd_packed_block(const WinogradPackedParams&, int64_t, int64_t, const uint16_t*, float*) {
}

#endif

void winograd_pack_bf16(const uint16_t* u, int64_t Cin, int64_t Cout, uint16_t* u_packed) {
  const int64_t K2 = Cin / 2, NB = Cout / kWinogradPackCols;
  for (int64_t k = 0; k < kWinogradPoints; ++k)
    for (int64_t nb = 0; nb < NB; ++nb)
      for (int64_t q = 0; q < K2; ++q)
        for (int64_t j = 0; j < kWinogradPackCols; ++j)
          for (int64_t h = 0; h < 2; ++h)
            u_packed[(((k * NB + nb) * K2 + q) * kWinogradPackCols + j) * 2 + h] =
                u[(k * Cin + 2 * q + h) * Cout + nb * kWinogradPackCols + j];
}

}  // namespace iddpm::cpu

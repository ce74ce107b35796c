// csrc/cuda/attention_fwd_sm90.cuh — Hopper (sm_90a) forward kernel of the fused QKV attention
// (CUDA C++17, no torch): warpgroup MMA (wgmma) on 128-byte-swizzled shared-memory tiles, a
// producer warpgroup feeding multi-buffered key/value stages through mbarriers, two consumer
// warpgroups. Launched by attention_fwd_sm90.cu (only when built for sm_90a and asked for, see
// docs/attention.md); compiled for the host by tests/ops/cuda_emulation/ on top of
// sm90_emulator.h. NEVER RUN ON A CARD YET.
//
// Same contract as attn_fwd_kernel (attention_fwd_kernel.cuh): qkv [BH, 3C, T] (q | k | v, each
// [C, T], T contiguous), out [BH, C, T], lse [BH, T] = (m + log2 l)·ln2; fp16 / bf16 in, fp32
// accumulation, base-2 online softmax with the logit scale folded into scale_log2, keys ≥ T
// masked to -inf, the output rounded once. Head dims C = 64 and 128 (C == tile width).
//
// CTA: 3 warpgroups (384 threads) per (b·h, tile of BQ = 128 queries).
//  * Warpgroup 0, the producer: copies the q tile once, then key/value tiles of BK = 128
//    positions into kStages stages (2; pipelined: 6 at C = 64, 3 at C = 128), straight from the
//    [C, T] layout into 128-byte-swizzled [C rows × 64 positions] blocks (below); it refills a
//    stage after the consumers' arrivals on its `empty` mbarrier (count 256). Two ways, chosen
//    by the launcher:
//    - TMA (T % 8 == 0, qkv 16-byte aligned): one thread issues cp.async.bulk.tensor.2d boxes of
//      [C × 64] through a tensor map over qkv as [B·3·H·C, T] with the 128-byte swizzle (zeros
//      past T), after an arrive.expect_tx of the stage's bytes on its `full` mbarrier (count 1;
//      q rides on stage 0's first phase);
//    - otherwise every producer thread copies with 16-byte cp.async or guarded element loads,
//      writing the same swizzled layout, waits for its own copies, fences them into the async
//      proxy (fence.proxy.async: wgmma reads shared memory through it) and arrives on `full`
//      (count 128).
//  * Warpgroups 1, 2, the consumers: warpgroup 1 + w owns queries 64w..64w+63 of the tile. Per
//    key tile: S = qᵀk (64 × 128 per warpgroup, fp32) by C/16 wgmma m64n128k16 with A = q
//    (M-major, imm-trans-a = 1) and B = k (N-major, imm-trans-b = 1) from shared memory; the
//    online softmax of the sm_80 kernel on the S registers (rows g, g + 8 of each warp's 16,
//    quad reductions); O += P·vᵀ by 8 wgmma m64nCk16 with A = P from registers (the S
//    accumulator layout is the A fragment layout, as with mma.sync) and B = v (K-major, the
//    keys contiguous), then an arrival on the stage's `empty` barrier once the products that
//    read it have retired (wgmma.wait_group 0). The pipelined consumers (kPipe) run the same
//    steps in another order: S of tile kt issued with P·vᵀ of tile kt - 1, the softmax of tile
//    kt while the latter is in flight, the two warpgroups taking turns (see the loop below).
//
// Shared-memory tiles: a [C, 64]-position block of q, k or v is C rows of 128 bytes, the 16-byte
// chunk ch of row r stored at chunk ch ^ (r % 8) (the 128-byte swizzle), every block 1024-byte
// aligned. For wgmma this one storage is
//   q as A (M = positions, K = channels), M-major:  SBO = 1024 (8 channel rows), one M block;
//   k as B (K = channels, N = positions), N-major:  SBO = 1024, LBO = C·128 (next 64 positions);
//   v as B (K = positions, N = channels), K-major:  SBO = 1024 (8 channel rows), the k16 step
//     j of a block at start + 32·(j % 4) bytes, blocks of 64 positions C·128 bytes apart.
#pragma once

#include "cuda/attention_sm90_common.cuh"

namespace iddpm::cuda::attn_sm90 {

using namespace attn_dev;

// kPipe: the pipelined consumers (below); they release a stage one key tile later, so they get
// more stages (6 at C = 64: 210 KB of shared memory; 3 at C = 128: 226 KB, as many as fit).
template <class T, int C, bool kPipe = false>
struct Sm90FwdCfg {
  static_assert(C == 64 || C == 128, "the sm_90a forward covers head dims 64 and 128");
  static constexpr int kConsumers = 2, BQ = 64 * kConsumers, BK = 128;
  static constexpr int kStages = !kPipe ? 2 : C == 64 ? 6 : 3;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBlockBytes = C * 128;  // a [C, 64] block
  static constexpr int kQBytes = (BQ / 64) * kBlockBytes, kKVBytes = (BK / 64) * kBlockBytes;
  // q, kStages × (k, v), then the mbarriers (full[kStages], empty[kStages]), then (pipelined)
  // one float per consumer thread that nothing reads (the softmax's anchor store, below); 1024
  // bytes of slack to align the tiles to the swizzle pattern.
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes;
  static constexpr int kAnchorOffset = kBarOffset + 8 * 2 * kStages;
  static constexpr size_t kSmemBytes = 1024 + kAnchorOffset + (kPipe ? 4 * 128 * kConsumers : 0);
  static_assert(kSmemBytes <= kMaxSmemBytes, "sm_90a forward shared memory over the limit");
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // setmaxnreg (384 threads)
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register file");
};

// The consumers' steps on one key tile (both loops below use them).

// Issues S = qᵀk for this warpgroup's 64 queries and the 128 keys at k_addr (no fence, commit
// or wait): channels 16kk.. are rows 16kk.. of every block, 2048 bytes per step.
template <int C, bool kBf16>
__device__ __forceinline__ void issue_s(float (&sacc)[64], uint32_t q_addr, uint32_t k_addr) {
  constexpr int kBlock = C * 128;
#pragma unroll
  for (int kk = 0; kk < C / 16; ++kk) {
    wgmma_ss_n128_tt<kBf16>(sacc, sw128_desc(q_addr + kk * 2048, kBlock, 1024),
                            sw128_desc(k_addr + kk * 2048, kBlock, 1024), kk > 0);
  }
}

// Issues O += P·vᵀ for the P fragments pa and the 128 keys at v_addr (no fence, commit or
// wait): keys 16kj.. are bytes 32(kj % 4).. of the rows of block kj / 4.
template <int C, bool kBf16>
__device__ __forceinline__ void issue_pv(float (&o)[C / 2], const uint32_t (&pa)[8][4],
                                         uint32_t v_addr) {
  constexpr int kBlock = C * 128;
#pragma unroll
  for (int kj = 0; kj < 8; ++kj) {
    wgmma_rs_k<C, kBf16>(o, pa[kj],
                         sw128_desc(v_addr + (kj >> 2) * kBlock + (kj & 3) * 32, 16, 1024));
  }
}

// The online softmax of key tile kt on the S accumulators (base-2 logits, keys past T masked;
// as attn_fwd_kernel): sacc becomes P (relative to the new row maxima), m_row and l_row are
// updated, alpha gets the factor by which O must be rescaled.
__device__ __forceinline__ void softmax_tile(float (&sacc)[64], int kt, int T_len, float scale_log2,
                                             int t, float (&m_row)[2], float (&l_row)[2],
                                             float (&alpha)[2]) {
  constexpr int NS = 64, BK = 128;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int j = kt * BK + 8 * (i >> 2) + 2 * t + (i & 1);
    const float v = j < T_len ? sacc[i] * scale_log2 : -INFINITY;
    sacc[i] = v;
    mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], v);
  }
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m_row[r] = attn::online_max_update(m_row[r], quad_max(mx[r]), &alpha[r], Max{}, Exp2{});
  }
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const float p = attn::online_prob(sacc[i], m_row[(i >> 1) & 1], Exp2{});
    sacc[i] = p;
    sum[(i >> 1) & 1] += p;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) l_row[r] = attn::online_sum_update(l_row[r], alpha[r], sum[r]);
}

// P (fp32 accumulators) packed into the A fragments of O += P·vᵀ.
template <class T>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[8][4], const float (&sacc)[64]) {
#pragma unroll
  for (int kj = 0; kj < 8; ++kj) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      pa[kj][r] = Elem<T>::pack(sacc[8 * kj + 2 * r], sacc[8 * kj + 2 * r + 1]);
    }
  }
}

// qkv: [BH, 3C, T]; out: [BH, C, T]; lse: [BH, T]. Dynamic shared memory: Cfg::kSmemBytes.
template <class T, int C, bool kPipe = false>
__global__ void __launch_bounds__(Sm90FwdCfg<T, C, kPipe>::kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ TmaMap tmap, const T* __restrict__ qkv,
                         T* __restrict__ out, float* __restrict__ lse, int T_len, float scale_log2,
                         bool vec, bool tma) {
#if defined(IDDPM_ATTN_HOST_EMULATION) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  using Cfg = Sm90FwdCfg<T, C, kPipe>;
  constexpr int BK = Cfg::BK, kStages = Cfg::kStages, kBlock = Cfg::kBlockBytes;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Align the tiles to 1024 bytes of the shared window (the swizzle pattern's period).
  unsigned char* base = smem_raw + ((1024 - (shared_addr(smem_raw) & 1023)) & 1023);
  unsigned char* qs = base;
  unsigned char* ks = qs + Cfg::kQBytes;             // stage s at ks + s·kKVBytes
  unsigned char* vs = ks + kStages * Cfg::kKVBytes;  // stage s at vs + s·kKVBytes
  const uint32_t bar0 = shared_addr(base + Cfg::kBarOffset);
  auto full = [&](int s) { return bar0 + 8u * s; };
  auto empty = [&](int s) { return bar0 + 8u * (kStages + s); };

  // One CTA per (b·h, query tile), the query tiles of a head adjacent in launch order, so that
  // the CTAs running together share their head's k and v in L2 (FlashAttention's order).
  const int q_tiles = (T_len + Cfg::BQ - 1) / Cfg::BQ;
  const int64_t bh = blockIdx.x / q_tiles;
  const int q0 = static_cast<int>(blockIdx.x % q_tiles) * Cfg::BQ;
  const int64_t CT = static_cast<int64_t>(C) * T_len;
  const T* qg = qkv + bh * 3 * CT;
  const T* kg = qg + CT;
  const T* vg = kg + CT;
  const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
  const int n_tiles = (T_len + BK - 1) / BK;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), tma ? 1 : 128);  // TMA: one arrival (with its bytes); else every copier
      mbar_init(empty(s), 128 * Cfg::kConsumers);
    }
    // The initialised barriers made visible to the async proxy, whose TMA complete_tx updates
    // them (the CUDA programming guide's TMA example and CUTLASS's fence_barrier_init do this).
    fence_proxy_async();
  }
  __syncthreads();  // the initialized barriers, before any thread uses them

  if (wg == 0) {  // ---- producer --------------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tma) {  // one thread issues every copy; the mbarriers count their bytes
      if (tid == 0) {
        const int row_q = static_cast<int>(bh * 3 * C), row_k = row_q + C, row_v = row_q + 2 * C;
        for (int kt = 0; kt < n_tiles; ++kt) {
          const int s = kt % kStages;
          mbar_wait(empty(s), ((kt / kStages) & 1) ^ 1);  // as below
          mbar_arrive_expect_tx(full(s), 2 * Cfg::kKVBytes + (kt == 0 ? Cfg::kQBytes : 0));
          if (kt == 0) {  // q rides on the first stage's barrier
            for (int b = 0; b < Cfg::BQ / 64; ++b) {
              tma_copy_2d(shared_addr(qs + b * kBlock), &tmap, q0 + 64 * b, row_q, full(0));
            }
          }
          for (int b = 0; b < BK / 64; ++b) {
            const int p0 = kt * BK + 64 * b;
            tma_copy_2d(shared_addr(ks + s * Cfg::kKVBytes + b * kBlock), &tmap, p0, row_k,
                        full(s));
            tma_copy_2d(shared_addr(vs + s * Cfg::kKVBytes + b * kBlock), &tmap, p0, row_v,
                        full(s));
          }
        }
      }
      return;
    }
    for (int b = 0; b < Cfg::BQ / 64; ++b) {
      load_block_sw128<T, C>(qs + b * kBlock, qg, T_len, q0 + 64 * b, T_len, vec, tid);
    }
    // No barrier of its own: each thread's q copies land (and are fenced) before its first
    // arrival on full(0), which every consumer waits for before its first product.
    for (int kt = 0; kt < n_tiles; ++kt) {
      const int s = kt % kStages;
      // Round r = kt / kStages of stage s: wait for the consumers' release of round r - 1
      // (parity (r - 1) & 1; for r = 0 the parity 1 of a fresh barrier passes at once).
      mbar_wait(empty(s), ((kt / kStages) & 1) ^ 1);
      for (int b = 0; b < BK / 64; ++b) {
        load_block_sw128<T, C>(ks + s * Cfg::kKVBytes + b * kBlock, kg, T_len, kt * BK + 64 * b,
                               T_len, vec, tid);
        load_block_sw128<T, C>(vs + s * Cfg::kKVBytes + b * kBlock, vg, T_len, kt * BK + 64 * b,
                               T_len, vec, tid);
      }
      arrive_after_copies(full(s));
    }
    return;
  }

  // ---- consumers: warpgroup 1 + cw owns queries q0 + 64cw .. +63 ---------------------------
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int cw = wg - 1, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  constexpr int NS = BK / 2, NO = C / 2;  // this thread's S and O accumulators
  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.0f;
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};  // rows g, g + 8

  const uint32_t q_addr = shared_addr(qs + cw * kBlock);
  auto k_at = [&](int kt) { return shared_addr(ks + (kt % kStages) * Cfg::kKVBytes); };
  auto v_at = [&](int kt) { return shared_addr(vs + (kt % kStages) * Cfg::kKVBytes); };
  float sacc[NS], alpha[2];
  uint32_t pa[BK / 16][4];
  if constexpr (!kPipe) {
    for (int kt = 0; kt < n_tiles; ++kt) {
      const int s = kt % kStages;
      mbar_wait(full(s), (kt / kStages) & 1);
      wgmma_fence();
      issue_s<C, kBf16>(sacc, q_addr, k_at(kt));
      wgmma_commit();
      wgmma_wait_on<0>(sacc);
      softmax_tile(sacc, kt, T_len, scale_log2, t, m_row, l_row, alpha);
#pragma unroll
      for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
      // Every A fragment of P is packed before the fence: a register written between two
      // wgmmas of one batch makes ptxas serialise them (it injects a warpgroup.arrive before
      // each, C7519).
      pack_p<T>(pa, sacc);
      wgmma_fence_on(o, pa);
      issue_pv<C, kBf16>(o, pa, v_at(kt));
      wgmma_commit();
      wgmma_wait_on<0>(o, pa);
      mbar_arrive(empty(s));  // this thread's products that read stage s have retired
    }
  } else {
    // Pipelined (FlashAttention-3's two overlaps): each batch issues S for key tile kt and
    // O += P·vᵀ for tile kt - 1 together, then the softmax of tile kt runs while the P·vᵀ
    // products are still on the tensor cores (wait_group 1 retires S only); and the two
    // consumer warpgroups take turns issuing their batches (named barriers 1 and 2, 256
    // threads: a warpgroup waits on its own, then arrives on the other's), so one warpgroup's
    // softmax runs while the other's products do. A stage is released once the P·vᵀ that reads
    // its v has retired, one tile later than above.
    volatile float* anchor =
        reinterpret_cast<volatile float*>(base + Cfg::kAnchorOffset) + 128 * cw;
    const int my_turn = 1 + cw, other_turn = 2 - cw;
    if (cw == 1) named_bar_arrive(1, 256);  // warpgroup 1 (cw = 0) takes the first turn
    mbar_wait(full(0), 0);
    named_bar_sync(my_turn, 256);
    wgmma_fence();
    issue_s<C, kBf16>(sacc, q_addr, k_at(0));
    wgmma_commit();
    named_bar_arrive(other_turn, 256);
    wgmma_wait_on<0>(sacc);
    softmax_tile(sacc, 0, T_len, scale_log2, t, m_row, l_row, alpha);  // O is still 0
    pack_p<T>(pa, sacc);
    for (int kt = 1; kt < n_tiles; ++kt) {
      mbar_wait(full(kt % kStages), (kt / kStages) & 1);
      named_bar_sync(my_turn, 256);
      wgmma_fence_on(o, pa);
      issue_s<C, kBf16>(sacc, q_addr, k_at(kt));
      wgmma_commit();
      issue_pv<C, kBf16>(o, pa, v_at(kt - 1));
      wgmma_commit();
      named_bar_arrive(other_turn, 256);
      wgmma_wait_on<1>(sacc);  // S of tile kt; O and pa stay untouched until the next wait
      softmax_tile(sacc, kt, T_len, scale_log2, t, m_row, l_row, alpha);
      // The anchor: a shared-memory store of a value that needs every exponential of the
      // softmax (the row sums), before the wait. Without it ptxas 13.0 put the wait about 140
      // instructions into the softmax, before its shuffles and exponentials, so that nothing
      // overlapped P·vᵀ; a store stays ahead of the wait, and the softmax with it (SASS).
      anchor[tid] = l_row[0] + l_row[1];
      wgmma_wait_on<0>(o, pa);
      mbar_arrive(empty((kt - 1) % kStages));  // tile kt - 1's products have retired
#pragma unroll
      for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
      pack_p<T>(pa, sacc);
    }
    named_bar_sync(my_turn, 256);
    wgmma_fence_on(o, pa);
    issue_pv<C, kBf16>(o, pa, v_at(n_tiles - 1));
    wgmma_commit();
    named_bar_arrive(other_turn, 256);
    wgmma_wait_on<0>(o, pa);
    mbar_arrive(empty((n_tiles - 1) % kStages));
  }

  // l is a per-thread partial sum over its columns: complete it over the quad.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    inv_l[r] = 1.0f / l;
    const int i = q0 + 64 * cw + 16 * warp + g + 8 * r;
    if (t == 0 && i < T_len) lse[bh * T_len + i] = attn::row_lse(m_row[r], l, Log2{});
  }
  T* og = out + bh * CT;
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    const int c = 8 * (n >> 2) + 2 * t + (n & 1);
    const int i = q0 + 64 * cw + 16 * warp + g + 8 * ((n >> 1) & 1);
    if (i < T_len)
      og[c * static_cast<int64_t>(T_len) + i] = Elem<T>::from_f(o[n] * inv_l[(n >> 1) & 1]);
  }
#endif
}

}  // namespace iddpm::cuda::attn_sm90

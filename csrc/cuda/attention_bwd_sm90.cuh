// csrc/cuda/attention_bwd_sm90.cuh — Hopper (sm_90a) backward kernel of the fused QKV attention
// (CUDA C++17, no torch): warpgroup MMA (wgmma) on 128-byte-swizzled shared-memory tiles, a
// producer warpgroup streaming query tiles through mbarrier-guarded stages, two consumer
// warpgroups. Launched by attention_bwd_sm90.cu between the sm_80 backward's delta and dq kernels
// (attention_bwd_kernel.cuh), only when built for sm_90a and asked for (docs/attention.md);
// compiled for the host by tests/ops/cuda_emulation/ on top of sm90_emulator.h. NEVER RUN ON A
// CARD YET.
//
// Same contract and math as attn_bwd_kernel (FlashAttention-2's scheme on the [C, T] layout):
// qkv [BH, 3C, T], dout [BH, C, T], lse and delta (D_i = Σ_c dO·O) [BH, T] in fp32; per key tile
//   Sᵀ = kᵀq,  dPᵀ = vᵀdO,  Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e),  dSᵀ = Pᵀ ∘ (dPᵀ − D)
//   (zero outside the T × T square), dvᵀ += Pᵀ dOᵀ, dkᵀ += dSᵀ qᵀ, dqᵀ += k dSᵀ,
// dk (× scale) and dv written once into grad_qkv's k, v channels, dqᵀ added to the fp32
// [BH, C, T] buffer dq_accum with atomics (scaled and cast by attn_dq_kernel). fp16 / bf16 in,
// fp32 accumulation; head dims C = 64 and 128 (C == tile width).
//
// CTA: 3 warpgroups (384 threads) per (b·h, tile of BK = 128 keys).
//  * Warpgroup 0, the producer: copies the k and v tiles once (two [C, 64] blocks each), then the
//    q and dO blocks of each tile of BQ = 64 queries into kStages = 2 stages, each signalled on
//    its `full` mbarrier and refilled after the consumers' 256 arrivals on its `empty` one; the
//    k and v tiles ride on stage 0's first phase. As the forward: TMA boxes through tensor maps
//    over qkv ([B·3·H·C, T]) and dout ([B·H·C, T]) when both allow it, else cp.async / guarded
//    loads into the same swizzled layout, fenced into the async proxy before the arrival.
//  * Warpgroups 1, 2, the consumers: warpgroup 1 + w owns keys 64w..64w+63 of the tile (block w
//    of k and v) and keeps dkᵀ, dvᵀ (64 × C, fp32) in registers. Per query tile:
//      Sᵀ, dPᵀ (64 × 64) by 2·C/16 wgmma m64n64k16, A = k or v block (M-major: keys along M),
//        B = the q or dO block (N-major: queries along N);
//      Pᵀ, dSᵀ on the accumulators (lse·log2e and D of the tile's queries from the stage's row
//        statistics, which the producer stores beside q and dO);
//      dSᵀ stored to one of this warpgroup's two [64 keys, 64 queries] swizzled blocks (by tile
//        parity), fenced into the async proxy, and an arrival on its `ds` mbarrier (count 128);
//      dvᵀ += Pᵀ·dOᵀ and dkᵀ += dSᵀ·qᵀ by 4 + 4 wgmma m64nCk16 with A from registers (the
//        accumulator layout is the A fragment layout) and B = the dO or q block (K-major: queries
//        along K), waited for before
//      the wait on `ds` (all 128 threads' dSᵀ stored), then dqᵀ (C × 64) = k·dSᵀ per 64 channels
//        by 4 wgmma m64n64k16, A = the k block (K-major: keys along K, channels along M), B = the
//        dSᵀ block (N-major), after the stage's release on `empty` (its last readers, the dv and
//        dk products, have retired); after the wait for them, dqᵀ goes to dq_accum with
//        atomicAdd, or (kBulkDq) into one of the warpgroup's two [64 channels × 64 queries] fp32
//        buffers in shared memory and from there by two TMA bulk reductions (add) of
//        [64 × 32] boxes issued by one thread, FlashAttention-3's way: whole 128-byte rows
//        reach L2 instead of 8-byte pieces of 32 scattered atomics per thread.
//    At the end dk·scale and dv are stored from the accumulators (keys < T).
#pragma once

#include "cuda/attention_sm90_common.cuh"

namespace iddpm::cuda::attn_sm90 {

template <class T, int C, bool kBulkDq = false>
struct Sm90BwdCfg {
  static_assert(C == 64 || C == 128, "the sm_90a backward covers head dims 64 and 128");
  static constexpr int kConsumers = 2, BK = 64 * kConsumers, BQ = 64, kStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBlockBytes = C * 128;               // a [C, 64] block
  static constexpr int kKVBytes = (BK / 64) * kBlockBytes;  // the k (or v) tile
  static constexpr int kStageBytes = 2 * kBlockBytes;       // one query tile's q and dO
  static constexpr int kDsBytes = 64 * 128;                 // a dSᵀ block [64 keys, 64 queries]
  static constexpr int kDqBytes = 64 * 64 * 4;  // a dqᵀ buffer: [64 channels, 64 queries] f32
  // k, v, kStages × (q, dO), kConsumers × 2 dSᵀ blocks, with kBulkDq kConsumers × 2 dqᵀ
  // buffers, kStages × (lse·log2e, D) [BQ] f32, then the mbarriers (full[kStages],
  // empty[kStages], ds[kConsumers]); 1024 bytes of slack to align the tiles to the swizzle.
  static constexpr int kDqOffset = 2 * kKVBytes + kStages * kStageBytes + kConsumers * 2 * kDsBytes;
  static constexpr int kRowStatsOffset = kDqOffset + (kBulkDq ? kConsumers * 2 * kDqBytes : 0);
  static constexpr int kBarOffset = kRowStatsOffset + kStages * 2 * BQ * 4;
  static constexpr size_t kSmemBytes = 1024 + kBarOffset + 8 * (2 * kStages + kConsumers);
  static_assert(kSmemBytes <= kMaxSmemBytes, "sm_90a backward shared memory over the limit");
  // setmaxnreg (384 threads); ptxas (13.0) reports no spills at C = 64 and 128.
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register file");
};

// qkv: [BH, 3C, T]; dout: [BH, C, T]; lse, delta: [BH, T]; grad_qkv: [BH, 3C, T] (its k and v
// channels written here); dq_accum: [BH, C, T] fp32, zeroed, accumulated here: with kBulkDq by
// TMA reductions through tmap_dq (tma_params_dq; unused otherwise), else with atomics (separate
// instances: the two ways in one kernel made ptxas spill at C = 128). Dynamic shared memory:
// Cfg::kSmemBytes.
template <class T, int C, bool kBulkDq = false>
__global__ void __launch_bounds__(Sm90BwdCfg<T, C, kBulkDq>::kThreads, 1)
    attn_bwd_sm90_kernel(const __grid_constant__ TmaMap tmap_qkv,
                         const __grid_constant__ TmaMap tmap_do,
                         const __grid_constant__ TmaMap tmap_dq, const T* __restrict__ qkv,
                         const T* __restrict__ dout, const float* __restrict__ lse,
                         const float* __restrict__ delta, T* __restrict__ grad_qkv,
                         float* __restrict__ dq_accum, int T_len, float scale, float scale_log2,
                         bool vec, bool tma) {
#if defined(IDDPM_ATTN_HOST_EMULATION) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  using Cfg = Sm90BwdCfg<T, C, kBulkDq>;
  constexpr int BQ = Cfg::BQ, kStages = Cfg::kStages, kBlock = Cfg::kBlockBytes;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Align the tiles to 1024 bytes of the shared window (the swizzle pattern's period).
  unsigned char* base = smem_raw + ((1024 - (shared_addr(smem_raw) & 1023)) & 1023);
  unsigned char* ks = base;                              // block b at ks + b·kBlock
  unsigned char* vs = ks + Cfg::kKVBytes;                // block b at vs + b·kBlock
  unsigned char* qs = vs + Cfg::kKVBytes;                // stage s: q, then dO
  unsigned char* dss = qs + kStages * Cfg::kStageBytes;  // consumer w: dss + 2w·kDsBytes, +1
  // kBulkDq: consumer w's dqᵀ buffers at kDqOffset + 2w·kDqBytes, + kDqBytes
  // stage s: lse·log2e of its queries at rows + 2·BQ·s, D at rows + 2·BQ·s + BQ
  float* rows = reinterpret_cast<float*>(base + Cfg::kRowStatsOffset);
  const uint32_t bar0 = shared_addr(base + Cfg::kBarOffset);
  auto full = [&](int s) { return bar0 + 8u * s; };
  auto empty = [&](int s) { return bar0 + 8u * (kStages + s); };
  auto ds_bar = [&](int w) { return bar0 + 8u * (2 * kStages + w); };

  // One CTA per (b·h, key tile), the key tiles of a head adjacent in launch order, so that the
  // CTAs running together share their head's q and dO in L2 (FlashAttention's order).
  const int k_tiles = (T_len + Cfg::BK - 1) / Cfg::BK;
  const int64_t bh = blockIdx.x / k_tiles;
  const int j0 = static_cast<int>(blockIdx.x % k_tiles) * Cfg::BK;
  const int64_t CT = static_cast<int64_t>(C) * T_len;
  const T* qg = qkv + bh * 3 * CT;
  const T* kg = qg + CT;
  const T* vg = kg + CT;
  const T* dog = dout + bh * CT;
  const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
  const int n_tiles = (T_len + BQ - 1) / BQ;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 128);  // every producer thread (TMA: thread 0's with the bytes)
      mbar_init(empty(s), 128 * Cfg::kConsumers);
    }
    for (int w = 0; w < Cfg::kConsumers; ++w) mbar_init(ds_bar(w), 128);
    fence_proxy_async();  // the initialised barriers, visible to the TMA's complete_tx
  }
  __syncthreads();  // the initialized barriers, before any thread uses them

  if (wg == 0) {  // ---- producer --------------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const float* lse_g = lse + bh * T_len;
    const float* delta_g = delta + bh * T_len;
    const int row_q = static_cast<int>(bh * 3 * C), row_do = static_cast<int>(bh * C);
    if (!tma) {
      for (int b = 0; b < Cfg::BK / 64; ++b) {
        load_block_sw128<T, C>(ks + b * kBlock, kg, T_len, j0 + 64 * b, T_len, vec, tid);
        load_block_sw128<T, C>(vs + b * kBlock, vg, T_len, j0 + 64 * b, T_len, vec, tid);
      }
      // No barrier of its own: each thread's k, v copies land (and are fenced) before its first
      // arrival on full(0), which every consumer waits for before its first product.
    }
    for (int it = 0; it < n_tiles; ++it) {
      const int s = it % kStages, i0 = it * BQ;
      // Round r = it / kStages of stage s waits for the release of round r - 1 (parity
      // (r - 1) & 1; a fresh barrier passes parity 1 at once).
      mbar_wait(empty(s), ((it / kStages) & 1) ^ 1);
      if (tid < BQ) {  // the row statistics (padded queries: 0, masked by the consumers)
        const bool valid = i0 + tid < T_len;
        rows[2 * BQ * s + tid] = valid ? attn::lse_to_base2(lse_g[i0 + tid]) : 0.0f;
        rows[2 * BQ * s + BQ + tid] = valid ? delta_g[i0 + tid] : 0.0f;
      }
      unsigned char* st = qs + s * Cfg::kStageBytes;
      if (tma) {  // one thread issues the copies; the barrier counts their bytes
        if (tid == 0) {
          mbar_arrive_expect_tx(full(s), Cfg::kStageBytes + (it == 0 ? 2 * Cfg::kKVBytes : 0));
          if (it == 0) {  // k and v ride on the first stage's barrier
            for (int b = 0; b < Cfg::BK / 64; ++b) {
              tma_copy_2d(shared_addr(ks + b * kBlock), &tmap_qkv, j0 + 64 * b, row_q + C, full(0));
              tma_copy_2d(shared_addr(vs + b * kBlock), &tmap_qkv, j0 + 64 * b, row_q + 2 * C,
                          full(0));
            }
          }
          tma_copy_2d(shared_addr(st), &tmap_qkv, i0, row_q, full(s));
          tma_copy_2d(shared_addr(st + kBlock), &tmap_do, i0, row_do, full(s));
        } else {
          mbar_arrive(full(s));
        }
      } else {
        load_block_sw128<T, C>(st, qg, T_len, i0, T_len, vec, tid);
        load_block_sw128<T, C>(st + kBlock, dog, T_len, i0, T_len, vec, tid);
        arrive_after_copies(full(s));
      }
    }
    return;
  }

  // ---- consumers: warpgroup 1 + cw owns keys j0 + 64cw .. +63 -------------------------------
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int cw = wg - 1, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  constexpr int NA = C / 2;  // this thread's dkᵀ, dvᵀ accumulators (64 × C)
  float dk[NA], dv[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) dk[i] = dv[i] = 0.0f;
  // This thread's accumulator rows (keys): g and g + 8 of its warp's 16.
  const int key0 = j0 + 64 * cw + 16 * warp + g;
  const bool key_ok[2] = {key0 < T_len, key0 + 8 < T_len};
  const uint32_t k_addr = shared_addr(ks + cw * kBlock);
  const uint32_t v_addr = shared_addr(vs + cw * kBlock);
  unsigned char* ds_tiles = dss + 2 * cw * Cfg::kDsBytes;
  float* dqg = dq_accum + bh * CT;
  // Bulk dq: this warpgroup's two dqᵀ buffers, this thread's byte in them (channel row
  // 16·warp + g, query pair 8(t & 1) bytes into its chunk) and its swizzle key.
  const uint32_t dq_addr =
      kBulkDq ? shared_addr(base + Cfg::kDqOffset + 2 * cw * Cfg::kDqBytes) : 0;
  const uint32_t dq_lane = (16 * warp + g) * 128 + 8 * (t & 1);
  const int dq_key = g ^ (t >> 1);

  for (int it = 0; it < n_tiles; ++it) {
    const int s = it % kStages, i0 = it * BQ;
    mbar_wait(full(s), (it / kStages) & 1);
    const uint32_t q_addr = shared_addr(qs + s * Cfg::kStageBytes);
    const uint32_t do_addr = q_addr + kBlock;

    // Sᵀ = kᵀq and dPᵀ = vᵀdO: channels 16kk.. are rows 16kk.. of every block (2048 bytes).
    float st[32], dpt[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) {
      wgmma_ss_n64<true, kBf16>(st, sw128_desc(k_addr + kk * 2048, kBlock, 1024),
                                sw128_desc(q_addr + kk * 2048, kBlock, 1024), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) {
      wgmma_ss_n64<true, kBf16>(dpt, sw128_desc(v_addr + kk * 2048, kBlock, 1024),
                                sw128_desc(do_addr + kk * 2048, kBlock, 1024), kk > 0);
    }
    wgmma_commit();
    wgmma_wait_on<0>(st, dpt);

    // Pᵀ and dSᵀ in place: element n is (key row g + 8·((n >> 1) & 1), query column
    // il = 8·(n >> 2) + 2t + (n & 1)); zero outside the T × T square.
    const float* l2 = rows + 2 * BQ * s;
    const float* dd = l2 + BQ;
#pragma unroll
    for (int n = 0; n < 32; ++n) {
      const int il = 8 * (n >> 2) + 2 * t + (n & 1);
      const bool valid = key_ok[(n >> 1) & 1] && i0 + il < T_len;
      const float p = valid ? attn::recomputed_prob(st[n] * scale_log2, l2[il], Exp2{}) : 0.0f;
      st[n] = p;
      dpt[n] = attn::logit_grad(p, dpt[n], dd[il]);
    }
    // A fragments of the k16 step kj (queries 16kj..): register r holds elements 8kj + 2r, +1.
    uint32_t pa[4][4], sa[4][4];
#pragma unroll
    for (int kj = 0; kj < 4; ++kj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[kj][r] = Elem<T>::pack(st[8 * kj + 2 * r], st[8 * kj + 2 * r + 1]);
        sa[kj][r] = Elem<T>::pack(dpt[8 * kj + 2 * r], dpt[8 * kj + 2 * r + 1]);
      }
    }
    // dSᵀ to this warpgroup's block of this tile's parity: key row kr = 16·warp + g + 8h, the
    // pair of queries 8j + 2t at byte 4t of 16-byte chunk j, swizzled to chunk j ^ (kr % 8). The
    // block's last readers, the dq products of tile it - 2, have retired in every warp of the
    // warpgroup: each warp waited for them before its arrival on `ds` for tile it - 1, which this
    // thread's wait on `ds` then saw complete. (One block would rest on a warp's wait_group
    // implying the other warps' reads of a shared operand are done, which the PTX ISA does not
    // promise.)
    unsigned char* ds_tile = ds_tiles + (it & 1) * Cfg::kDsBytes;
    const uint32_t ds_addr = shared_addr(ds_tile);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kr = 16 * warp + g + 8 * h;
        st_shared_b32(ds_tile + kr * 128 + ((j ^ (kr & 7)) << 4) + 4 * t,
                      sa[j >> 1][2 * (j & 1) + h]);
      }
    }
    fence_proxy_async();  // the stores, visible to wgmma's reads (async proxy)
    mbar_arrive(ds_bar(cw));

    // dvᵀ += Pᵀ dOᵀ, dkᵀ += dSᵀ qᵀ: queries 16kj.. are bytes 32kj.. of the block's rows.
    wgmma_fence_on(dv, dk, pa, sa);
#pragma unroll
    for (int kj = 0; kj < 4; ++kj) {
      wgmma_rs_k<C, kBf16>(dv, pa[kj], sw128_desc(do_addr + kj * 32, 16, 1024));
    }
#pragma unroll
    for (int kj = 0; kj < 4; ++kj) {
      wgmma_rs_k<C, kBf16>(dk, sa[kj], sw128_desc(q_addr + kj * 32, 16, 1024));
    }
    wgmma_commit();

    // dqᵀ[c, i] = Σ_keys k[c, key] dSᵀ[key, i], 64 channels at a time: keys 16kj.. are bytes
    // 32kj.. of the k block's rows and rows 16kj.. (2048 bytes each step) of the dSᵀ block.
    // The dv, dk products retire first: their A fragments (P, dS: 32 registers) stay allocated
    // until then, and beside dkᵀ, dvᵀ and dq's accumulators they made ptxas spill at C = 128
    // (the tensor cores run one warpgroup's products in order either way).
    wgmma_wait_on<0>(dv, dk, pa, sa);
    mbar_arrive(empty(s));  // this thread's readers of stage s (Sᵀ, dPᵀ, dv, dk) have retired
    mbar_wait(ds_bar(cw), it & 1);
#pragma unroll
    for (int mb = 0; mb < C / 64; ++mb) {
      float dq[32];
      wgmma_fence();
#pragma unroll
      for (int kj = 0; kj < 4; ++kj) {
        wgmma_ss_n64<false, kBf16>(dq, sw128_desc(k_addr + mb * 8192 + kj * 32, 16, 1024),
                                   sw128_desc(ds_addr + kj * 2048, Cfg::kDsBytes, 1024), kj > 0);
      }
      wgmma_commit();
      wgmma_wait_on<0>(dq);
      if constexpr (kBulkDq) {
        // dqᵀ into this warpgroup's buffer of this chunk's parity, as two TMA boxes of [64
        // channels × 32 queries] in the 128-byte swizzle: query pair il, il + 1 of channel row r
        // at byte 4·(il % 4) of 16-byte chunk (il % 32) / 4, swizzled to chunk ^ (r % 8) (two
        // wavefronts per warp store, the least for 256 bytes). The buffer's last reader, the
        // reduction of chunk - 2, finished reading before the barrier of chunk - 1 (its issuer
        // waited); this chunk's reduction is issued once every thread's stores are fenced
        // (barrier), and waited for (.read) before the next chunk's barrier.
        // (r % 8 = g, and chunk (il % 32) / 4 = 2·(n / 4 % 4) + t / 2, so the swizzled chunk is
        // 2·(n / 4 % 4) ^ (g ^ t / 2).)
        const int chunk = it * (C / 64) + mb;
        const uint32_t buf = dq_addr + (chunk & 1) * Cfg::kDqBytes;
#pragma unroll
        for (int n = 0; n < 32; n += 2) {
          st_shared_f32x2(buf + dq_lane + (n >> 4) * 8192 + ((n >> 1) & 1) * 1024 +
                              ((2 * ((n >> 2) & 3) ^ dq_key) << 4),
                          dq[n], dq[n + 1]);
        }
        fence_proxy_async();  // the stores, visible to the reduction's reads (async proxy)
        if (tid == 0) bulk_wait_read<0>();  // chunk - 1's reduction has read its buffer
        named_bar_sync(1 + cw, 128);
        if (tid == 0) {
          const int row = static_cast<int>(bh * C) + 64 * mb;
          tma_reduce_add_2d(&tmap_dq, i0, row, buf);
          tma_reduce_add_2d(&tmap_dq, i0 + 32, row, buf + 8192);
          bulk_commit();
        }
      } else {
#pragma unroll
        for (int n = 0; n < 32; ++n) {
          const int c = 64 * mb + 16 * warp + g + 8 * ((n >> 1) & 1);
          const int i = i0 + 8 * (n >> 2) + 2 * t + (n & 1);
          if (i < T_len) atomicAdd(dqg + c * static_cast<int64_t>(T_len) + i, dq[n]);
        }
      }
    }
  }
  // The last reductions read shared memory and write dq_accum: done before the block ends.
  if (kBulkDq && tid == 0) bulk_wait<0>();

  // dk (× scale: the logits are scale·qᵀk) and dv into grad_qkv's k, v channels: element n is
  // (key row g + 8·((n >> 1) & 1), channel 8·(n >> 2) + 2t + (n & 1)).
  T* gk = grad_qkv + bh * 3 * CT + CT;
  T* gv = gk + CT;
#pragma unroll
  for (int n = 0; n < NA; ++n) {
    const int h = (n >> 1) & 1, c = 8 * (n >> 2) + 2 * t + (n & 1);
    if (key_ok[h]) {
      const int64_t at = c * static_cast<int64_t>(T_len) + key0 + 8 * h;
      gk[at] = Elem<T>::from_f(dk[n] * scale);
      gv[at] = Elem<T>::from_f(dv[n]);
    }
  }
#endif
}

}  // namespace iddpm::cuda::attn_sm90

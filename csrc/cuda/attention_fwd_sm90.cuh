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
//    positions into kStages = 2 stages, straight from the [C, T] layout into 128-byte-swizzled
//    [C rows × 64 positions] blocks (below); it refills a stage after the consumers' arrivals on
//    its `empty` mbarrier (count 256). Two ways, chosen by the launcher:
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
//    read it have retired (wgmma.wait_group 0).
//
// Shared-memory tiles: a [C, 64]-position block of q, k or v is C rows of 128 bytes, the 16-byte
// chunk ch of row r stored at chunk ch ^ (r % 8) (the 128-byte swizzle), every block 1024-byte
// aligned. For wgmma this one storage is
//   q as A (M = positions, K = channels), M-major:  SBO = 1024 (8 channel rows), one M block;
//   k as B (K = channels, N = positions), N-major:  SBO = 1024, LBO = C·128 (next 64 positions);
//   v as B (K = positions, N = channels), K-major:  SBO = 1024 (8 channel rows), the k16 step
//     j of a block at start + 32·(j % 4) bytes, blocks of 64 positions C·128 bytes apart.
#pragma once

#include "cuda/attention_common.cuh"

#if !defined(IDDPM_ATTN_HOST_EMULATION)
#include <cuda.h>  // CUtensorMap, the type only: the driver is reached through the runtime
#endif

namespace iddpm::cuda::attn_sm90 {

using namespace attn_dev;

// The TMA descriptor of qkv seen as a 2-D tensor [rows = B·3·H·C, T] (T innermost), boxes of
// [C rows × 64 positions] with the 128-byte swizzle: built on the host by the launcher
// (cuTensorMapEncodeTiled) or, under emulation, by the emulator from the same parameters.
#if defined(IDDPM_ATTN_HOST_EMULATION)
using TmaMap = attn_emu::TensorMap2D;
#else
using TmaMap = CUtensorMap;
#endif

struct TmaParams {
  uint64_t dim[2];   // {T, rows}
  uint64_t stride1;  // bytes from one row to the next
  uint32_t box[2];   // {64, C}
};

// The TMA path: T % 8 == 0 (rows a multiple of 16 bytes apart), qkv 16-byte aligned, and row /
// position coordinates within int32. Otherwise the producer copies with cp.async / loads.
inline bool tma_usable(const void* qkv, int64_t rows, int64_t T_len) {
  return T_len % 8 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
         rows < (int64_t{1} << 31) && T_len < (int64_t{1} << 31);
}

template <int C>
inline TmaParams tma_params(int64_t rows, int64_t T_len) {
  TmaParams p;
  p.dim[0] = static_cast<uint64_t>(T_len);
  p.dim[1] = static_cast<uint64_t>(rows);
  p.stride1 = static_cast<uint64_t>(T_len) * 2;
  p.box[0] = 64;
  p.box[1] = C;
  return p;
}

template <class T, int C>
struct Sm90FwdCfg {
  static_assert(C == 64 || C == 128, "the sm_90a forward covers head dims 64 and 128");
  static constexpr int kConsumers = 2, BQ = 64 * kConsumers, BK = 128, kStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBlockBytes = C * 128;  // a [C, 64] block
  static constexpr int kQBytes = (BQ / 64) * kBlockBytes, kKVBytes = (BK / 64) * kBlockBytes;
  // q, kStages × (k, v), then the mbarriers (full[kStages], empty[kStages]); 1024 bytes
  // of slack to align the tiles to the swizzle pattern.
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes;
  static constexpr size_t kSmemBytes = 1024 + kBarOffset + 8 * 2 * kStages;
  static_assert(kSmemBytes <= kMaxSmemBytes, "sm_90a forward shared memory over the limit");
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // setmaxnreg (384 threads)
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register file");
};

// ---- sm_90a instructions (inline PTX; host emulator hooks under IDDPM_ATTN_HOST_EMULATION) ----
__device__ __forceinline__ uint32_t shared_addr(const void* p) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  return attn_emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::mbar_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

// mbarrier.arrive.expect_tx: `bytes` more transaction bytes for the current phase, then arrive.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::mbar_arrive(bar, bytes);
#else
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], "
      "%1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
#endif
}

// One TMA box (positions c0.., rows c1..) into shared memory at dst, completing its bytes on bar.
__device__ __forceinline__ void tma_copy_2d(uint32_t dst, const TmaMap* map, int c0, int c1,
                                            uint32_t bar) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::tma_load_2d(dst, map, c0, c1, bar);
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::mbar_arrive(bar);
#else
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.release.cta.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
      : "memory");
#endif
}

// Returns once the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::mbar_wait_parity(bar, parity);
#else
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// Makes this thread's generic-proxy writes of shared memory (its landed cp.async copies, its
// stores) visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::fence_proxy_async();
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#if !defined(IDDPM_ATTN_HOST_EMULATION)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#if !defined(IDDPM_ATTN_HOST_EMULATION)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// A shared-memory matrix descriptor, 128-byte swizzle, base offset 0 (PTX ISA 9.7.15.5.1.2.2).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t start, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((start & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

#if !defined(IDDPM_ATTN_HOST_EMULATION)
// clang-format off
// Accumulator operand lists of the inline PTX: N/2 "+f" registers.
#define IDDPM_W8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                       "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define IDDPM_W32(d, i) IDDPM_W8(d, i), IDDPM_W8(d, i + 8), IDDPM_W8(d, i + 16), IDDPM_W8(d, i + 24)
#define IDDPM_REGS32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define IDDPM_REGS64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
// clang-format on
#endif

// d (64 × 128, this thread's 64 floats) (+)= A · B with A (64 × 16) and B (16 × 128) in shared
// memory, both transposed (M- / N-major): S = qᵀk. scale_d = false: d = A · B.
template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_n128_tt(float (&d)[64], uint64_t da, uint64_t db,
                                                 bool scale_d) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma(128, kBf16, d, da, nullptr, db, scale_d, true, true);
#else
  // clang-format off
#define IDDPM_WGMMA_SS(AB)                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " " IDDPM_REGS64 ", " \
               "%64, %65, p, 1, 1, 1, 1;\n}\n"                                                  \
               : IDDPM_W32(d, 0), IDDPM_W32(d, 32)                                              \
               : "l"(da), "l"(db), "r"(static_cast<int>(scale_d)))
  // clang-format on
  if constexpr (kBf16) {
    IDDPM_WGMMA_SS("bf16");
  } else {
    IDDPM_WGMMA_SS("f16");
  }
#undef IDDPM_WGMMA_SS
#endif
}

// d (64 × N, this thread's N/2 floats) += A · B with A (64 × 16) in registers (a[4], the
// m64nNk16 A fragment) and B (16 × N) in shared memory, K-major: O += P·vᵀ.
template <int N, bool kBf16>
__device__ __forceinline__ void wgmma_rs_k(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma(N, kBf16, d, 0, a, db, true, false, false);
#else
  static_assert(N == 64 || N == 128, "O tiles of 64 or 128 channels");
  if constexpr (N == 64) {
    if constexpr (kBf16) {
      asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " IDDPM_REGS32
                   ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
                   : IDDPM_W32(d, 0)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
    } else {
      asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " IDDPM_REGS32
                   ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
                   : IDDPM_W32(d, 0)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
    }
  } else {
    if constexpr (kBf16) {
      asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " IDDPM_REGS64
                   ", {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
                   : IDDPM_W32(d, 0), IDDPM_W32(d, 32)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
    } else {
      asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " IDDPM_REGS64
                   ", {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
                   : IDDPM_W32(d, 0), IDDPM_W32(d, 32)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
    }
  }
#endif
}

// The producer's copy of one [C, 64] block: positions col0..col0+63 of the C rows at g (row
// stride T_len) into the swizzled block at s (1024-byte aligned); zeros past T. 128 threads.
template <class T, int C>
__device__ __forceinline__ void load_block_sw128(unsigned char* s, const T* g, int64_t ldg,
                                                 int col0, int T_len, bool vec, int tid) {
  constexpr int E = 8;  // 16-byte chunks of 8 elements, 8 per 128-byte row
  static_assert(sizeof(T) == 2, "16-bit elements");
  for (int idx = tid; idx < C * 8; idx += 128) {
    const int r = idx >> 3, ch = idx & 7, p0 = col0 + E * ch;
    unsigned char* dst = s + r * 128 + ((ch ^ (r & 7)) << 4);
    if (vec) {
      const bool valid = p0 < T_len;  // T_len % 8 == 0: a chunk is all in or all out
      cp_async_16(dst, valid ? g + r * ldg + p0 : g, valid);
    } else {
      T* d = reinterpret_cast<T*>(dst);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        d[e] = p0 + e < T_len ? g[r * ldg + p0 + e] : Elem<T>::from_f(0.0f);
      }
    }
  }
}

// qkv: [BH, 3C, T]; out: [BH, C, T]; lse: [BH, T]. Dynamic shared memory: Cfg::kSmemBytes.
template <class T, int C>
__global__ void __launch_bounds__(Sm90FwdCfg<T, C>::kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ TmaMap tmap, const T* __restrict__ qkv,
                         T* __restrict__ out, float* __restrict__ lse, int T_len, float scale_log2,
                         bool vec, bool tma) {
#if defined(IDDPM_ATTN_HOST_EMULATION) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  using Cfg = Sm90FwdCfg<T, C>;
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

  const int64_t bh = blockIdx.x;
  const int q0 = blockIdx.y * Cfg::BQ;
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
      cp_async_wait_all();
      fence_proxy_async();
      mbar_arrive(full(s));
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
  for (int kt = 0; kt < n_tiles; ++kt) {
    const int s = kt % kStages;
    mbar_wait(full(s), (kt / kStages) & 1);
    const uint32_t k_addr = shared_addr(ks + s * Cfg::kKVBytes);
    const uint32_t v_addr = shared_addr(vs + s * Cfg::kKVBytes);

    // S = qᵀk: channels 16kk.. are rows 16kk.. of every block, 2048 bytes per step.
    float sacc[NS];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) {
      wgmma_ss_n128_tt<kBf16>(sacc, sw128_desc(q_addr + kk * 2048, kBlock, 1024),
                              sw128_desc(k_addr + kk * 2048, kBlock, 1024), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();

    // Base-2 logits, keys past T masked; online softmax as attn_fwd_kernel.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int j = kt * BK + 8 * (i >> 2) + 2 * t + (i & 1);
      const float v = j < T_len ? sacc[i] * scale_log2 : -INFINITY;
      sacc[i] = v;
      mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], v);
    }
    float alpha[2], sum[2] = {0.0f, 0.0f};
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
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];

    // O += P·vᵀ: keys 16kj.. are bytes 32(kj % 4).. of the rows of block kj / 4. Every A
    // fragment of P is packed before the fence: a register written between two wgmmas of one
    // batch makes ptxas serialise them (it injects a warpgroup.arrive before each, C7519).
    uint32_t pa[BK / 16][4];
#pragma unroll
    for (int kj = 0; kj < BK / 16; ++kj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[kj][r] = Elem<T>::pack(sacc[8 * kj + 2 * r], sacc[8 * kj + 2 * r + 1]);
      }
    }
    wgmma_fence();
#pragma unroll
    for (int kj = 0; kj < BK / 16; ++kj) {
      wgmma_rs_k<C, kBf16>(o, pa[kj],
                           sw128_desc(v_addr + (kj >> 2) * kBlock + (kj & 3) * 32, 16, 1024));
    }
    wgmma_commit();
    wgmma_wait<0>();
    mbar_arrive(empty(s));  // this thread's products that read stage s have retired
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

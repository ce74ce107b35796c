// csrc/cuda/attention_sm90_common.cuh — the building blocks of the Hopper (sm_90a) attention
// kernels (attention_fwd_sm90.cuh, attention_bwd_sm90.cuh), CUDA C++17, no torch: the TMA
// tensor-map parameters of qkv / dO seen as [rows, T], inline PTX for mbarriers, TMA copies,
// fence.proxy.async, setmaxnreg and wgmma (with shared-memory matrix descriptors in the 128-byte
// swizzle), and the producer's copy of one swizzled [C, 64] block. Under
// IDDPM_ATTN_HOST_EMULATION every instruction calls the CPU emulator
// (tests/ops/cuda_emulation/sm90_emulator.h) instead. NEVER RUN ON A CARD YET.
//
// Shared-memory tiles: a [C, 64]-position block of q, k, v or dO is C rows of 128 bytes, the
// 16-byte chunk ch of row r stored at chunk ch ^ (r % 8) (the 128-byte swizzle), every block
// 1024-byte aligned. The one storage serves wgmma in three ways (PTX ISA 9.7.15.5.1.2):
//   as the M-major A or N-major B operand (positions along M / N, channels along K):
//     SBO = 1024 (8 channel rows), the k16 step kk at start + 2048·kk, a second block of 64
//     positions at LBO = C·128 (N > 64);
//   as the K-major B (or A) operand (positions along K, channels along N / M): SBO = 1024
//     (8 channel rows), the k16 step j of a block at start + 32·(j % 4) bytes, blocks of 64
//     positions C·128 bytes apart, M blocks of 64 channel rows 8192 bytes apart.
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
  uint32_t box[2];   // {positions, rows}
};

// A tensor map over `data` as [rows, T] with elements of elem_bytes: its rows must be a multiple
// of 16 bytes apart (T % 8 == 0 for 16-bit elements, T % 4 == 0 for fp32), data 16-byte aligned,
// and row / position coordinates within int32. Otherwise the kernels take their other path
// (the producer: cp.async / loads; the backward's dq: atomics).
inline bool tma_usable(const void* data, int64_t rows, int64_t T_len, int elem_bytes = 2) {
  return (T_len * elem_bytes) % 16 == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0 &&
         rows < (int64_t{1} << 31) && T_len < (int64_t{1} << 31);
}

// [rows, T] of elem_bytes elements in boxes of [box_rows × box_positions].
inline TmaParams tma_params_2d(int64_t rows, int64_t T_len, int elem_bytes, uint32_t box_positions,
                               uint32_t box_rows) {
  TmaParams p;
  p.dim[0] = static_cast<uint64_t>(T_len);
  p.dim[1] = static_cast<uint64_t>(rows);
  p.stride1 = static_cast<uint64_t>(T_len) * elem_bytes;
  p.box[0] = box_positions;
  p.box[1] = box_rows;
  return p;
}

// qkv / dO (16-bit): boxes of [C × 64] (128 bytes per row: the 128-byte swizzle).
template <int C>
inline TmaParams tma_params(int64_t rows, int64_t T_len) {
  return tma_params_2d(rows, T_len, 2, 64, C);
}

// The backward's bulk dq (AttentionBwdParams::sm90_bulk_dq): dq_accum, fp32 [BH·C rows, T], as
// the destination of TMA reductions of boxes of [64 channel rows × 32 positions] (128 bytes, as
// the loads), where tma_usable(dq_accum, rows, T, 4); otherwise atomics.
inline TmaParams tma_params_dq(int64_t rows, int64_t T_len) {
  return tma_params_2d(rows, T_len, 4, 32, 64);
}

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

// A producer thread's hand-over of a stage it filled with cp.async: its copies land, are made
// visible to the async proxy (wgmma's reads), then it arrives on the stage's `full` barrier.
__device__ __forceinline__ void arrive_after_copies(uint32_t full_bar) {
  cp_async_wait_all();
  fence_proxy_async();
  mbar_arrive(full_bar);
}

// A 4-byte generic store to shared memory that a wgmma will read as an operand (after this
// thread's fence.proxy.async and a barrier); under emulation, recorded as unfenced until then.
__device__ __forceinline__ void st_shared_b32(void* p, uint32_t v) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::st_shared(p, &v, 4);
#else
  *static_cast<uint32_t*>(p) = v;
#endif
}

// An 8-byte generic store of two floats to shared memory (shared-window address a, 8-byte
// aligned) that a bulk reduction will read (after this thread's fence.proxy.async and a
// barrier); under emulation, recorded as unfenced.
__device__ __forceinline__ void st_shared_f32x2(uint32_t a, float x, float y) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  const float v[2] = {x, y};
  attn_emu::st_shared(const_cast<unsigned char*>(attn_emu::smem_at(a, 8,
                                                                   "st.shared outside the "
                                                                   "block's shared memory")),
                      v, 8);
#else
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(a), "f"(x), "f"(y) : "memory");
#endif
}

// cp.reduce.async.bulk.tensor.2d ... .add: adds the box at src (shared memory, laid out as a TMA
// load of the map would write it, 128-byte swizzle included) into the map's fp32 tensor at
// (positions c0.., rows c1..); elements outside the tensor are skipped. Joins this thread's
// next bulk async-group (bulk_commit).
__device__ __forceinline__ void tma_reduce_add_2d(const TmaMap* map, int c0, int c1, uint32_t src) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::tma_reduce_add_2d(src, map, c0, c1);
#else
  asm volatile(
      "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], "
      "[%3];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(src)
      : "memory");
#endif
}

// cp.async.bulk.commit_group: this thread's bulk operations since its last commit form a group.
__device__ __forceinline__ void bulk_commit() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::bulk_commit();
#else
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

// cp.async.bulk.wait_group.read N: all but this thread's newest N bulk groups have finished
// reading their shared-memory sources (which may then be overwritten).
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::bulk_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}

// cp.async.bulk.wait_group N: all but this thread's newest N bulk groups have completed (their
// writes to global memory done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::bulk_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
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

// Named barrier `id` (1..15; 0 is __syncthreads's) over n threads (a multiple of 32, every
// thread of a warp executing it): bar.sync arrives and waits for the barrier's completion,
// bar.arrive arrives without waiting (PTX ISA 9.7.13.1).
__device__ __forceinline__ void named_bar_sync(int id, int n) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::named_bar_sync(id, n);
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
#endif
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::named_bar_arrive(id, n);
#else
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
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

// Pins register values at this point of the instruction stream (as CUTLASS's
// warpgroup_fence_operand): what computes them stays before it, what reads them after it. The
// wgmma fence and wait asm statements name no registers, so without this the compiler may move
// an access of a wgmma's accumulators or A fragments across them. No-op under emulation (which
// runs in source order).
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#if !defined(IDDPM_ATTN_HOST_EMULATION)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N][4]) {
#if !defined(IDDPM_ATTN_HOST_EMULATION)
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
#endif
}

// wgmma.fence with the registers the next wgmmas access (accumulators, A fragments) pinned
// before it; wgmma.wait_group N with the registers of the groups it retires pinned after it.
template <class... Regs>
__device__ __forceinline__ void wgmma_fence_on(Regs&... regs) {
  (reg_fence(regs), ...);
  wgmma_fence();
}
template <int N, class... Regs>
__device__ __forceinline__ void wgmma_wait_on(Regs&... regs) {
  wgmma_wait<N>();
  (reg_fence(regs), ...);
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

// d (64 × 64, this thread's 32 floats) (+)= A · B with A (64 × 16) and B (16 × 64) in shared
// memory; B N-major (imm-trans-b = 1), A M-major (kTransA: Sᵀ = kᵀq, dPᵀ = vᵀdO in the backward)
// or K-major (dqᵀ = k·dSᵀ). scale_d = false: d = A · B.
template <bool kTransA, bool kBf16>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db,
                                             bool scale_d) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::wgmma(64, kBf16, d, da, nullptr, db, scale_d, kTransA, true);
#else
  // clang-format off
#define IDDPM_WGMMA_SS64(AB, TA)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                   \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." AB "." AB " " IDDPM_REGS32 ", "  \
               "%32, %33, p, 1, 1, " TA ", 1;\n}\n"                                            \
               : IDDPM_W32(d, 0)                                                               \
               : "l"(da), "l"(db), "r"(static_cast<int>(scale_d)))
  // clang-format on
  if constexpr (kBf16 && kTransA) {
    IDDPM_WGMMA_SS64("bf16", "1");
  } else if constexpr (kBf16) {
    IDDPM_WGMMA_SS64("bf16", "0");
  } else if constexpr (kTransA) {
    IDDPM_WGMMA_SS64("f16", "1");
  } else {
    IDDPM_WGMMA_SS64("f16", "0");
  }
#undef IDDPM_WGMMA_SS64
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

}  // namespace iddpm::cuda::attn_sm90

// tests/ops/cuda_emulation/warp_emulator.h — a small host emulator of a CUDA thread block, enough
// to run the attention kernels of csrc/cuda/attention_*_kernel.cuh unchanged on the CPU.
//
// Each CUDA thread of a block is a coroutine on its own stack (made with makecontext, entered
// once with swapcontext, after that switched with _setjmp/_longjmp, which make no signal-mask
// system call as swapcontext does). Threads run until they reach a collective
// operation: a block barrier (__syncthreads) or a warp-collective instruction (__shfl_sync, and,
// through the hooks of attention_common.cuh, mma.sync, ldmatrix). A warp's collective is
// resolved once all 32 lanes have reached it — from every lane's operands at once, following
// the fragment layouts of the PTX ISA — and a barrier once every thread of the block is at it.
// Warps drift apart at random (a ready warp collective is resolved with probability 1/2 per
// round), so that only __syncthreads keeps warps together, as on the GPU. The TF32 path's
// cvt.rna.tf32.f32 is emulated bit for bit (cvt_rna_tf32) and its m16n8k8 mma.sync refuses
// operands that are not TF32 (low 13 mantissa bits set), so an unrounded operand shows. cp.async
// copies are queued per thread and performed at that thread's cp.async.wait_all, so a missing wait
// or barrier shows up as stale data. Shared memory is filled with NaN before each block, and
// ldmatrix / cp.async check alignment and bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <setjmp.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __launch_bounds__(...)
#define IDDPM_ATTN_HOST_EMULATION 1

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace attn_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               threadIdx.x);
  std::fflush(stdout);
  std::_Exit(3);  // not exit(): it may run on a thread's stack, which static destructors free
}

// spin: polling a condition (an mbarrier's phase, a wgmma's completion), runnable again next
// round.
enum class St { run, wait_warp, wait_block, done, spin };
enum class Op { none, shfl, ldsm, mma_b16, mma_f32, mma_tf32 };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Lane {
  ucontext_t ctx;  // the first entry
  jmp_buf resume;  // where the lane continues after a yield
  bool started = false;
  char* stack = nullptr;  // from stack_pool(): reused by every block (no page faults per block)
  St st = St::run;
  Op op = Op::none;
  // operands / results of the pending collective
  float fval = 0, fres = 0;
  int src = 0;
  const void* addr = nullptr;
  bool flag = false;
  uint32_t a[4] = {}, b[2] = {}, r[4] = {};
  float2 fa[4] = {}, fb[2] = {};
  float c[4] = {};
  std::vector<Copy> pending;
  bool unfenced_copies = false;  // cp.async data landed since this thread's last fence.proxy.async
};

struct Block {
  std::vector<Lane> lanes;
  ucontext_t sched;
  jmp_buf sched_jb;  // the scheduler, waiting for the running lane to yield
  int cur = 0;
  std::function<void()> body;
  const unsigned char* smem_lo = nullptr;
  size_t smem_bytes = 0;
};

// The collectives are called from every product and load of every kernel instance: kept out of
// line, they keep the test's compile time down (and cost nothing measurable at run time).
#define IDDPM_EMU_NOINLINE __attribute__((noinline))

inline Block* g_block = nullptr;
// Hooks of sm90_emulator.h: per-block set-up / final checks. Null without it.
inline void (*g_block_start_hook)(unsigned threads) = nullptr;
inline void (*g_block_end_hook)() = nullptr;
// sm90_emulator.h: let runnable warps wait rounds at random (as warp collectives always do), so
// that producer and consumer warps drift apart.
inline bool g_random_delays = false;
// sm90_emulator.h: asynchronous copies in flight (TMA), advanced once per scheduler round (all of
// them when `all`); returns whether any are still in flight.
inline bool (*g_async_hook)(bool all) = nullptr;
// Counts state changes (a thread reaching anything but a spin, an mbarrier arrival): a round of
// the scheduler in which only spinning threads ran and this did not move is a deadlock.
inline uint64_t g_events = 0;
inline uint64_t g_rng = 0x9e3779b97f4a7c15ull;  // xorshift state of the warp scheduling

inline bool coin() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return g_rng & 1;
}

inline Lane& me() { return g_block->lanes[g_block->cur]; }

inline void yield(St st) {
  Lane& l = me();
  l.st = st;
  if (st != St::spin) ++g_events;
  if (_setjmp(l.resume) == 0) _longjmp(g_block->sched_jb, 1);
}

inline void trampoline() {
  g_block->body();
  me().st = St::done;
  ++g_events;
  _longjmp(g_block->sched_jb, 1);  // never returns: the scheduler's frame is where it jumps
}

constexpr size_t kStackBytes = 256 * 1024;

// Thread stacks, allocated once and reused by every block (fresh 256 KB stacks per lane and
// block made the kernel fault in and zero ~32 MB of pages per block: most of the run time).
inline char* stack_pool(unsigned i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() <= i) pool.emplace_back(new char[kStackBytes]);
  return pool[i].get();
}

// Runs lane i until it yields or finishes.
inline void enter(Block& blk, unsigned i) {
  Lane& l = blk.lanes[i];
  if (_setjmp(blk.sched_jb) != 0) return;
  if (!l.started) {
    l.started = true;
    swapcontext(&blk.sched, &l.ctx);  // first entry on the lane's own stack
  } else {
    _longjmp(l.resume, 1);
  }
}

// Global-memory ranges cp.async and TMA copies may read and TMA reductions write (registered by
// the harness).
struct Range {
  const void* lo;
  size_t bytes;
};
inline std::vector<Range> g_global;

// Whether [p, p + bytes) lies inside one of the registered global ranges.
inline bool inside_global(const void* p, size_t bytes) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (const Range& r : g_global) {
    const auto* lo = static_cast<const unsigned char*>(r.lo);
    if (q >= lo && q + bytes <= lo + r.bytes) return true;
  }
  return false;
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < g_block->smem_lo || q + bytes > g_block->smem_lo + g_block->smem_bytes) fail(what);
}

// ---- warp collectives, called from kernel code ----------------------------------------------
IDDPM_EMU_NOINLINE inline float shfl(float v, int src) {
  Lane& l = me();
  l.op = Op::shfl;
  l.fval = v;
  l.src = src & 31;
  yield(St::wait_warp);
  return me().fres;
}

IDDPM_EMU_NOINLINE inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  check_smem(p, 16, "ldmatrix row outside the block's dynamic shared memory");
  Lane& l = me();
  l.op = Op::ldsm;
  l.addr = p;
  l.flag = trans;
  yield(St::wait_warp);
  for (int i = 0; i < 4; ++i) r[i] = me().r[i];
}

IDDPM_EMU_NOINLINE inline void mma_b16(float (&c)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2], bool bf16) {
  Lane& l = me();
  l.op = Op::mma_b16;
  l.flag = bf16;
  for (int i = 0; i < 4; ++i) l.a[i] = a[i], l.c[i] = c[i];
  l.b[0] = b[0];
  l.b[1] = b[1];
  yield(St::wait_warp);
  for (int i = 0; i < 4; ++i) c[i] = me().c[i];
}

IDDPM_EMU_NOINLINE inline void mma_f32(float (&c)[4], const float2 (&a)[4], const float2 (&b)[2]) {
  Lane& l = me();
  l.op = Op::mma_f32;
  for (int i = 0; i < 4; ++i) l.fa[i] = a[i], l.c[i] = c[i];
  l.fb[0] = b[0];
  l.fb[1] = b[1];
  yield(St::wait_warp);
  for (int i = 0; i < 4; ++i) c[i] = me().c[i];
}

// fp32 -> TF32 as cvt.rna.tf32.f32 does it: round to nearest with ties away from zero at the
// 13th mantissa bit (adding half of the dropped part's unit to the magnitude carries into the
// exponent when it must, up to infinity), then clear the 13 low bits; NaN and infinity as
// they are.
inline uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, NaN: kept (no rounding)
  return (u + 0x1000u) & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: a, b hold TF32 bits.
IDDPM_EMU_NOINLINE inline void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  for (uint32_t x : a) {
    if (x & 0x1fffu) fail("tf32 mma: an A operand is not TF32 (low 13 bits set)");
  }
  for (uint32_t x : b) {
    if (x & 0x1fffu) fail("tf32 mma: a B operand is not TF32 (low 13 bits set)");
  }
  Lane& l = me();
  l.op = Op::mma_tf32;
  for (int i = 0; i < 4; ++i) l.a[i] = a[i], l.c[i] = c[i];
  l.b[0] = b[0];
  l.b[1] = b[1];
  yield(St::wait_warp);
  for (int i = 0; i < 4; ++i) c[i] = me().c[i];
}

IDDPM_EMU_NOINLINE inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (valid && reinterpret_cast<uintptr_t>(src) % 16)) {
    fail("cp.async address not 16-byte aligned");
  }
  check_smem(dst, 16, "cp.async destination outside dynamic shared memory");
  if (valid) {
    if (!inside_global(src, 16)) fail("cp.async reads outside every input buffer");
  }
  me().pending.push_back({dst, src, valid});
}

inline void cp_async_wait_all() {
  if (!me().pending.empty()) me().unfenced_copies = true;
  if (g_random_delays && !me().pending.empty()) {  // memory latency: 0..47 rounds, at random
    coin();
    for (uint64_t i = 0, n = g_rng % 48; i < n; ++i) yield(St::run);
  }
  for (const Copy& c : me().pending) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
  me().pending.clear();
}

// ---- resolution of a warp's collective ------------------------------------------------------
inline float b16_to_f(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// Fragment element (row, col) → (register, half) per the m16n8k16 layouts (see the .cuh).
inline void mma_resolve(Lane* w, bool is_f32, bool bf16) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
      for (int h = 0; h < 2; ++h) {
        A[m][k + h] = is_f32 ? (h ? w[lane].fa[i].y : w[lane].fa[i].x)
                             : b16_to_f(static_cast<uint16_t>(w[lane].a[i] >> (16 * h)), bf16);
      }
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * t + 8 * i;
      for (int h = 0; h < 2; ++h) {
        B[k + h][g] = is_f32 ? (h ? w[lane].fb[i].y : w[lane].fb[i].x)
                             : b16_to_f(static_cast<uint16_t>(w[lane].b[i] >> (16 * h)), bf16);
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = w[lane].c[i];
      for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      w[lane].c[i] = static_cast<float>(acc);
    }
  }
}

// m16n8k8 TF32 (PTX ISA): A a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4);
// B b0 = (k=t, n=g), b1 = (k=t+4, n=g); C as m16n8k16. The products of two TF32 values are exact
// in double, the sum is rounded once.
inline void mma_tf32_resolve(Lane* w) {
  double A[16][8], B[8][8];
  auto f = [](uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return static_cast<double>(x);
  };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = f(w[lane].a[i]);
    for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = f(w[lane].b[i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = w[lane].c[i];
      for (int k = 0; k < 8; ++k) acc += A[m][k] * B[k][n];
      w[lane].c[i] = static_cast<float>(acc);
    }
  }
}

// ldmatrix .x4: lanes 8q..8q+7 give the row addresses of matrix q. Without .trans lane L gets
// (row L/4, cols 2(L%4), +1) of each matrix; with .trans (rows 2(L%4), +1; col L/4).
inline void ldsm_resolve(Lane* w) {
  const bool trans = w[0].flag;
  for (int lane = 0; lane < 32; ++lane) {
    if (w[lane].flag != trans) fail("ldmatrix: lanes disagree on .trans");
    for (int q = 0; q < 4; ++q) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = trans ? 2 * (lane & 3) + h : lane >> 2;
        const int col = trans ? lane >> 2 : 2 * (lane & 3) + h;
        std::memcpy(&e[h], static_cast<const uint16_t*>(w[8 * q + row].addr) + col, 2);
      }
      w[lane].r[q] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
    }
  }
}

inline void resolve(Lane* w) {
  const Op op = w[0].op;
  for (int i = 0; i < 32; ++i) {
    if (w[i].op != op) fail("lanes of a warp at different collectives (divergence)");
  }
  switch (op) {
    case Op::shfl:
      for (int i = 0; i < 32; ++i) w[i].fres = w[w[i].src].fval;
      break;
    case Op::ldsm: ldsm_resolve(w); break;
    case Op::mma_b16: mma_resolve(w, false, w[0].flag); break;
    case Op::mma_f32: mma_resolve(w, true, false); break;
    case Op::mma_tf32: mma_tf32_resolve(w); break;
    default: fail("unknown collective");
  }
  for (int i = 0; i < 32; ++i) w[i].st = St::run, w[i].op = Op::none;
}

// Runs one block of `threads` threads (a multiple of 32) executing `body`.
inline void run_block(unsigned threads, unsigned char* smem, size_t smem_bytes,
                      std::function<void()> body) {
  Block blk;
  blk.lanes.resize(threads);
  blk.body = std::move(body);
  blk.smem_lo = smem;
  blk.smem_bytes = smem_bytes;
  std::memset(smem, 0xff, smem_bytes);  // NaN in every float type: uninitialized reads show
  g_block = &blk;
  if (g_block_start_hook) g_block_start_hook(threads);
  for (Lane& l : blk.lanes) {
    l.stack = stack_pool(static_cast<unsigned>(&l - blk.lanes.data()));
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = l.stack;
    l.ctx.uc_stack.ss_size = kStackBytes;
    l.ctx.uc_link = &blk.sched;
    makecontext(&l.ctx, trampoline, 0);
  }
  blockDim = dim3(threads, 1, 1);
  bool force = true;  // run everything this round (the first, and after one without progress)
  std::vector<char> skip(threads / 32, 0);
  std::vector<int> stall(threads / 32, 0);  // rounds a warp still sits out (random delays)
  for (;;) {
    const uint64_t events0 = g_events;
    bool skipped = false;
    for (Lane& l : blk.lanes) {
      if (l.st == St::spin) l.st = St::run;
    }
    // Random delays: a warp sits out a round with probability 1/2, and one round in 16 it starts
    // a stall of 8 to 39 rounds, so that warps drift many instructions apart (a barrier the
    // kernel lacks shows).
    for (size_t w = 0; w < skip.size(); ++w) {
      if (!g_random_delays || force) {
        skip[w] = 0;
        stall[w] = 0;
      } else if (stall[w] > 0) {
        skip[w] = 1;
        --stall[w];
      } else {
        skip[w] = coin();
        if (coin() && coin() && coin() && coin()) {
          stall[w] = 8 + (coin() | coin() << 1 | coin() << 2 | coin() << 3 | coin() << 4);
        }
      }
    }
    for (unsigned i = 0; i < threads; ++i) {
      if (blk.lanes[i].st != St::run) continue;
      if (skip[i / 32]) {
        skipped = true;
        continue;
      }
      blk.cur = static_cast<int>(i);
      threadIdx = make_uint3(i, 0, 0);
      enter(blk, i);
    }
    if (g_async_hook && g_async_hook(force)) skipped = true;  // copies still in flight
    bool progress = false;
    std::vector<unsigned> ready;
    for (unsigned w = 0; w < threads / 32; ++w) {
      Lane* lanes = &blk.lanes[32 * w];
      bool all = true;
      for (int i = 0; i < 32; ++i) all = all && lanes[i].st == St::wait_warp;
      if (all) ready.push_back(w);
    }
    for (unsigned w : ready) {  // at least one, the others at random: warps drift apart
      if (!progress || coin()) resolve(&blk.lanes[32 * w]), progress = true;
    }
    progress = progress || g_events != events0;
    unsigned done = 0, at_barrier = 0;
    for (const Lane& l : blk.lanes) done += l.st == St::done, at_barrier += l.st == St::wait_block;
    if (done == threads) break;
    if (at_barrier > 0 && at_barrier + done == threads) {
      if (done > 0) fail("__syncthreads with exited threads");
      for (Lane& l : blk.lanes) l.st = St::run;
      progress = true;
    }
    if (!progress && !skipped)
      fail("deadlock: a warp collective or barrier that not all threads reach");
    force = !progress;
  }
  for (const Lane& l : blk.lanes) {
    if (!l.pending.empty()) fail("cp.async never waited for");
  }
  if (g_block_end_hook) g_block_end_hook();
  g_block = nullptr;
}

}  // namespace attn_emu

// The CUDA intrinsics the kernels use, on top of the emulator.
inline void __syncthreads() { attn_emu::yield(attn_emu::St::wait_block); }
inline float __shfl_sync(unsigned, float v, int src) { return attn_emu::shfl(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return attn_emu::shfl(v, static_cast<int>(threadIdx.x & 31) ^ mask);
}
// A double as two 32-bit halves, each through the float shuffle (bit patterns kept).
inline double __shfl_xor_sync(unsigned m, double v, int mask) {
  uint32_t h[2];
  std::memcpy(h, &v, 8);
  for (uint32_t& w : h) {
    float f;
    std::memcpy(&f, &w, 4);
    f = __shfl_xor_sync(m, f, mask);
    std::memcpy(&w, &f, 4);
  }
  std::memcpy(&v, h, 8);
  return v;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

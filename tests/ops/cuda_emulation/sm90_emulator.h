// tests/ops/cuda_emulation/sm90_emulator.h — the Hopper (sm_90a) instructions of
// csrc/cuda/attention_{fwd,bwd}_sm90.cuh on top of warp_emulator.h: warpgroup MMA (wgmma.mma_async
// with shared-memory matrix descriptors, A from shared memory or registers), its fence /
// commit_group / wait_group, mbarrier (init, arrive, try_wait.parity), named barriers
// (bar.sync / bar.arrive), TMA loads and reductions with their bulk groups, fence.proxy.async
// and setmaxnreg. Written from the PTX ISA
// (sections 9.7.15 "Asynchronous warpgroup level matrix instructions" and 9.7.13.15 "mbarrier"),
// not from the kernel: the unit checks in attention_sm90_emulation.cpp compare these functions with
// the ISA's own worked examples.
//
// What is modelled, and how:
//  * Matrix descriptor (9.7.15.5.1.2.2): bits 0-13 start address, 16-29 leading dimension byte
//    offset (LBO), 32-45 stride dimension byte offset (SBO), each encoded as (x & 0x3FFFF) >> 4;
//    49-51 base offset; 62-63 swizzle (0 none, 1 128 B, 2 64 B, 3 32 B). A base offset other than
//    0 is refused (the kernel keeps every swizzle pattern 1024-byte aligned, where the ISA says
//    it is 0), as are the bits the ISA leaves unused when set.
//  * Canonical layouts (9.7.15.5.1.2.1.3), in elements, T = 16 / sizeof(element), W = swizzle
//    bytes / 16:  MN-major, swizzled   ((T,W,m),(8,k)) : ((1,T,LBO),(W·T,SBO))
//                 MN-major, none       ((T,1,m),(8,k)) : ((1,T,SBO),(T,LBO))
//                 K-major,  swizzled   ((8,m),(T,2k))  : ((W·T,SBO),(1,T))
//                 K-major,  none       ((8,m),(T,2k))  : ((T,SBO),(1,LBO))
//    then Swizzle<log2 W, 4, 3> on the byte address: bits [4, 4 + log2 W) ^= bits [7, 7 + log2 W)
//    (16-byte chunks permuted by bits 7.. of the address). The unit is the byte address: the
//    pattern then repeats every 2^(7 + log2 W) = 1024 / 512 / 256 bytes for 128 / 64 / 32 B, the
//    boundaries of the ISA's base-offset table (in 2-byte elements it would repeat at twice that).
//    The swizzle is applied to the whole shared-window address (start + offset), which is what
//    base offset 0 means: patterns that start on their repeat boundary.
//  * imm-trans-a / imm-trans-b (9.7.15.5.1.2): 0 = K-major, 1 = M- / N-major; 16-bit types only.
//  * Fragments (9.7.15.5.1.1.1, Figures 148 / 149): per warp w of the warpgroup, rows 16w..16w+15;
//    A in registers: a{2i, 2i+1} = register i = (row g + 8·(i&1), cols 2t + 8·(i>>1) + {0, 1});
//    D (f32): d[4j + i] = (row g + 8·(i>>1), col 8j + 2t + (i&1)), g = lane/4, t = lane%4.
//  * Asynchrony: every thread issues its part of a wgmma, commits and waits on its own (fence,
//    commit_group and wait_group are per thread here, not warpgroup barriers: the warps of a
//    warpgroup drift apart between them as on the GPU, where .sync.aligned aligns a warp). A
//    wgmma records its operands at issue (A registers read then); a warp's part of it (its 16
//    rows of D) runs some scheduler rounds after that warp's 32 threads have issued it, at
//    random (in issue order per warp; for half the instructions only once a thread of the warp
//    waits for it in wait_group), reading shared memory and the accumulators then and
//    writing D then; a thread's wait_group spins until its warp's parts of the instructions it
//    retires have run. The warps of a warpgroup are thus never ordered by each other's wgmmas
//    (the ISA's .sync.aligned is per warp): shared memory one warp writes and another's wgmma
//    reads needs a barrier. Reading D before the wait, or overwriting a tile before the wait
//    that retires its readers, gives wrong results.
//    The shared-memory operands are also read when the first thread issues the instruction and
//    must be unchanged when it runs: a write between the two (e.g. another warp's stores that
//    no barrier ordered before the first warp's issue) is refused.
//    A thread's A registers (register-A form) must be unchanged from its issue until its
//    warp's part runs, and its accumulator registers must hold, when the part runs, what the
//    previous in-flight wgmma on them wrote (or their value at issue): a write to either while
//    the instruction is in flight (before the wait_group that retires it) is refused.
//    Register arrays given to earlier wgmmas are recorded at each wgmma.fence: one written since
//    (other than by the products) is refused when the first wgmma of the batch accesses it (the
//    ISA's rule: wgmma.fence between a thread's register accesses and a wgmma that accesses the
//    same registers).
//    Each instruction's sum (16 products + D) is formed in double and rounded to fp32 once. A
//    wgmma issued without a wgmma.fence since the thread's last wait_group (or the start) is
//    refused (the ISA requires the fence before wgmma touches registers written in between).
//  * mbarrier (9.7.13.15): init(count) sets expected = pending = count, phase 0; arrive
//    decrements pending, completing the phase (phase + 1, pending = expected) at 0 while no
//    transaction count is outstanding; try_wait.parity(P) is true iff the current phase's
//    parity differs from P (so P = 1 passes on a fresh barrier). Waiters spin (other threads run).
//    Uninitialized barriers, misaligned ones and arrivals beyond the count are refused.
//  * fence.proxy.async: a thread whose cp.async data landed (cp.async.wait_all) must execute it
//    before it arrives on an mbarrier (the data are read by wgmma, through the async proxy). A
//    thread's generic stores to shared memory made through st_shared (the kernels' hook for the
//    stores a wgmma later reads) are unfenced until that thread executes it: a wgmma that reads a
//    byte still unfenced by its writer is refused.
//  * mbarrier transaction counts (9.7.13.15): arrive.expect_tx adds to the tx-count, a bulk copy's
//    complete_tx subtracts its bytes; a phase completes when arrivals and tx-count are both 0.
//  * TMA (cp.async.bulk.tensor.2d ... mbarrier::complete_tx::bytes, 9.7.9.25.5, with the tensor
//    map as cuTensorMapEncodeTiled documents it): a copy lands some scheduler rounds after it
//    was issued (at random), writing the box row after row (inner dimension first) into shared
//    memory through the 128-byte swizzle of the address when the map has it, zeros for
//    coordinates outside the tensor, then completes the whole box's bytes on its mbarrier.
//    The map's documented constraints (alignment, strides, box sizes) are checked.
//    At the end of a block every mbarrier must be between phases with a tx-count of 0 (so that
//    expect_tx and the bytes of the copies must agree).
//  * TMA reductions (cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group, with
//    cp.async.bulk.commit_group / wait_group{.read}, 9.7.9.25.5 / 9.7.9.25.6): at issue the box's
//    shared-memory source must be fenced into the async proxy (no byte stored through st_shared
//    by a thread that has not executed fence.proxy.async since) and is recorded; the reduction
//    runs some rounds later (at random; for half of them only while the issuing thread waits
//    in wait_group), reading the source through the map's swizzle, which must be unchanged since
//    the issue (else refused: overwritten before the wait that retires the read), and adding
//    each fp32 element inside the tensor to global memory (elements outside are skipped). A
//    thread's wait_group N spins until all but its newest N committed groups have run, and only
//    then retires them: from the issue to that retirement their source bytes are busy, and a
//    st_shared to a busy byte is refused even when the reduction has already run (whether it
//    has is timing, which the ISA leaves open; equal values written over it would not show as a
//    change). A reduction left in flight, unretired or uncommitted at the block's end is
//    refused. (Not modelled: the order between a retiring wait and another thread's store,
//    which needs a barrier after the wait; the kernel's barrier sits there.)
//  * setmaxnreg: a no-op (register allocation is not modelled).
// Refused (not implemented): other TMA modes (im2col, multicast, ranks other than 2, swizzles
// other than 128 B with a 128-byte inner box, loads of other than 16-bit elements, reductions
// other than fp32 add), plain cp.async.bulk, wgmma
// shapes other than m64nNk16 with f16 / bf16 inputs and f32 accumulators, scale-a/b = -1,
// sparse wgmma, clusters.
#pragma once

#include "warp_emulator.h"

#include <algorithm>
#include <deque>
#include <map>

namespace attn_emu {

// ---- descriptors and layouts (pure functions, unit-tested against the ISA's examples) --------
struct SmemDesc {
  uint32_t start, lbo, sbo;  // bytes
  int base_offset, swizzle;  // swizzle: 0 none, 1 128 B, 2 64 B, 3 32 B (the descriptor's code)
};

inline SmemDesc decode_desc(uint64_t d) {
  if (d & ((3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52))) {
    fail("wgmma descriptor: reserved bits set");
  }
  SmemDesc s;
  s.start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  s.lbo = static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4;
  s.sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  s.base_offset = static_cast<int>((d >> 49) & 7);
  s.swizzle = static_cast<int>((d >> 62) & 3);
  return s;
}

// 16-byte chunks per swizzle row (W): 8, 4, 2 for 128, 64, 32 B; 1 without swizzle.
inline int swizzle_width(int code) { return code == 1 ? 8 : code == 2 ? 4 : code == 3 ? 2 : 1; }

// Swizzle<log2 W, 4, 3> on a byte address.
inline uint32_t swizzle_addr(uint32_t a, int code) {
  const int w = swizzle_width(code);
  return a ^ (((a >> 7) & static_cast<uint32_t>(w - 1)) << 4);
}

// Byte offset (before the swizzle) of element (mn, k) of an operand in the canonical layout of
// `mn_major`, swizzle `code`, element size `eb`, strides lbo / sbo (bytes).
inline uint32_t canonical_offset(bool mn_major, int code, int eb, uint32_t lbo, uint32_t sbo,
                                 int mn, int k) {
  const int T = 16 / eb, W = swizzle_width(code);
  if (mn_major) {
    const int e = mn % T, c = (mn / T) % W, mi = mn / (T * W), r = k % 8, ki = k / 8;
    if (code == 0) return (e + r * T) * eb + mi * sbo + ki * lbo;
    return (e + c * T + r * W * T) * eb + mi * lbo + ki * sbo;
  }
  const int r = mn % 8, mi = mn / 8, e = k % T, kc = k / T;
  if (code == 0) return (r * T + e) * eb + mi * sbo + kc * lbo;
  if (kc >= W) fail("wgmma: K-major operand wider than its swizzle row");
  return (r * W * T + e + kc * T) * eb + mi * sbo;
}

// ---- per-block state ------------------------------------------------------------------------
struct Mbar {
  uint32_t expected = 0, pending = 0, phase = 0;
  int64_t tx = 0;  // transaction bytes expected and not yet completed
};

// A rank-2 TMA tensor map: the arguments cuTensorMapEncodeTiled takes (16-bit elements,
// interleave none, swizzle none or 128 B, zero fill out of bounds), checked as its
// documentation requires (encode_tensor_map_2d).
struct TensorMap2D {
  const void* base = nullptr;
  uint64_t dim[2] = {};     // dim[0] innermost
  uint64_t stride1 = 0;     // bytes between consecutive indices of dim 1
  uint32_t box[2] = {};     // box[0] innermost
  bool swizzle128 = false;  // CU_TENSOR_MAP_SWIZZLE_128B (else NONE)
  uint32_t elem = 2;        // bytes per element: 2 (FLOAT16 / BFLOAT16) or 4 (FLOAT32)
};

struct BulkCopy {
  uint32_t dst, bar;
  TensorMap2D map;  // a copy: the issuing thread may exit before the copy lands
  int32_t c0, c1;
};

// A TMA reduction in flight: its source box as the issue saw it, the issuing thread and the
// number of the reduction among that thread's.
struct BulkReduce {
  uint32_t src;
  TensorMap2D map;
  int32_t c0, c1;
  int lane;
  uint64_t seq;
  bool lazy;
  std::vector<unsigned char> source;
  bool done = false;  // has read its source and added (kept until its issuer's wait retires it)
};

struct WgOp {
  int n = 0;  // N of m64nNk16
  bool bf16 = false, a_in_regs = false, trans_a = false, trans_b = false, scale_d = true;
  uint64_t desc_a = 0, desc_b = 0;
  uint32_t a_regs[128][4] = {};
  const uint32_t* a_src[128] = {};  // each thread's A registers (a_in_regs), checked unchanged
  float* d[128] = {};               // each thread's accumulator registers (N/2 floats)
};

// One wgmma of a warpgroup, as its threads issue their parts.
struct PendingOp {
  WgOp op;
  int parts = 0;                  // threads that have issued it
  int wparts[4] = {};             // per warp of the warpgroup
  bool wdone[4] = {};             // the warp's part has run
  bool lazy = false;              // runs only once a thread of the warp waits for it (at random)
  std::vector<uint16_t> operand;  // its shared-memory operands at the first thread's issue
};

// A thread's accumulator registers while wgmmas on them are in flight: the bits they must hold
// when the next of those runs (as issued, then as the last one to run wrote them).
struct DShadow {
  int in_flight = 0;
  std::vector<uint32_t> bits;
};

struct Sm90Lane {
  std::map<const float*, DShadow> dshadow;  // by accumulator array
  // The register arrays this thread has given wgmmas (accumulators, A fragments: bytes), and
  // their bits at its last wgmma.fence, kept (updated by the products' own writes) until the
  // first wgmma of that fence's batch that accesses them.
  std::map<const void*, size_t> operands;
  std::map<const void*, std::vector<unsigned char>> at_fence;
  uint64_t issued = 0;          // wgmmas this thread has issued
  uint64_t committed = 0;       // of which committed (closed into groups)
  std::deque<uint64_t> groups;  // committed groups not yet retired: each one's end (exclusive)
  bool need_fence = true;
  std::vector<uint32_t> unfenced;  // shared bytes this thread stored (st_shared), not yet fenced
  // TMA reductions: issued, of which committed, and the committed groups not yet waited for.
  uint64_t bulk_issued = 0, bulk_committed = 0;
  std::deque<uint64_t> bulk_groups;
  bool bulk_waiting = false;  // spinning in cp.async.bulk.wait_group
};

struct Sm90Group {
  std::deque<PendingOp> ops;  // by issue order; ops[i] is the warpgroup's wgmma number base + i
  uint64_t base = 0;
  uint64_t wbase[4] = {};  // per warp: the number of the first wgmma whose part has not run
  int waiting[4] = {};     // per warp: threads spinning in wait_group
};

inline std::vector<Sm90Lane> g_sm90_lanes;
inline std::vector<Sm90Group> g_sm90_groups;
inline std::map<uint32_t, Mbar> g_mbars;  // by shared-window address
inline std::vector<BulkCopy> g_bulk;      // TMA copies in flight
inline std::vector<BulkReduce> g_reduce;  // TMA reductions issued, not yet retired by a wait
// Per shared byte: TMA reductions whose source holds it, issued and not yet retired by their
// issuing thread's cp.async.bulk.wait_group{.read} (a generic store to it is refused).
inline std::vector<uint16_t> g_reduce_busy;
inline std::vector<uint8_t> g_unfenced;  // per shared byte: stored by st_shared, not yet fenced
// Named barriers (bar.sync / bar.arrive with an id of 1..15): threads expected, arrived so far,
// completions.
struct NamedBar {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};
inline NamedBar g_named[16];

// The shared window: addresses are offsets from the block's dynamic shared memory (whose base
// the harness aligns to 1024 bytes, as the kernel's own alignment step assumes on the GPU).
inline uint32_t smem_offset(const void* p) {
  check_smem(p, 1, "shared address outside the block's dynamic shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - g_block->smem_lo);
}
inline const unsigned char* smem_at(uint32_t a, size_t bytes, const char* what) {
  if (a + bytes > g_block->smem_bytes) fail(what);
  return g_block->smem_lo + a;
}

inline void sm90_block_start(unsigned threads) {
  g_sm90_lanes.assign(threads, Sm90Lane{});
  g_sm90_groups.assign(threads / 128, Sm90Group{});
  g_mbars.clear();
  g_bulk.clear();
  g_reduce.clear();
  g_reduce_busy.assign(g_block->smem_bytes, 0);
  g_unfenced.assign(g_block->smem_bytes, 0);
  for (NamedBar& b : g_named) b = NamedBar{};
  g_random_delays = true;
}

inline void sm90_block_end() {
  for (const Sm90Group& g : g_sm90_groups) {
    if (!g.ops.empty()) fail("wgmma never waited for (wait_group)");
  }
  for (const Sm90Lane& l : g_sm90_lanes) {
    if (l.issued != l.committed || !l.groups.empty()) fail("wgmma never waited for (wait_group)");
  }
  if (!g_bulk.empty()) fail("TMA copy still in flight at the block's end");
  for (const Sm90Lane& l : g_sm90_lanes) {
    if (l.bulk_issued != l.bulk_committed) fail("TMA reduction never committed (commit_group)");
  }
  if (!g_reduce.empty()) {  // in flight, or run but never retired by a wait
    fail("TMA reduction still in flight at the block's end (no cp.async.bulk.wait_group)");
  }
  for (const auto& [a, b] : g_mbars) {  // every barrier between phases, no bytes outstanding
    if (b.tx != 0)
      fail("mbarrier: transaction bytes left over at the block's end (expect_tx != copies)");
    if (b.pending != b.expected) fail("mbarrier: a phase left incomplete at the block's end");
  }
}

inline bool sm90_async(bool all);

struct Sm90Install {
  Sm90Install() {
    g_block_start_hook = sm90_block_start;
    g_block_end_hook = sm90_block_end;
    g_async_hook = sm90_async;
  }
};

// ---- the products --------------------------------------------------------------------------
inline float b16_value(const unsigned char* p, bool bf16) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return b16_to_f(h, bf16);
}

// Element (mn, k) of a descriptor operand.
inline double desc_elem(const SmemDesc& s, bool mn_major, bool bf16, int mn, int k) {
  const uint32_t a = swizzle_addr(
      s.start + canonical_offset(mn_major, s.swizzle, 2, s.lbo, s.sbo, mn, k), s.swizzle);
  const unsigned char* p = smem_at(a, 2, "wgmma operand outside the block's shared memory");
  if (g_unfenced[a] || g_unfenced[a + 1]) {
    fail("wgmma reads shared memory stored by a thread that has not executed fence.proxy.async");
  }
  return b16_value(p, bf16);
}

inline void check_desc(const SmemDesc& s) {
  if (s.base_offset != 0) fail("wgmma descriptor: base offset != 0 is not emulated");
  if (s.start % 16) fail("wgmma descriptor: start address not 16-byte aligned");
}

// The bit patterns of a wgmma's shared-memory operands (A when it is a descriptor, then B), in a
// fixed order: what the first thread's issue saw, compared when the instruction runs.
inline std::vector<uint16_t> operand_bits(const WgOp& op) {
  std::vector<uint16_t> bits;
  auto take = [&](const SmemDesc& s, bool mn_major, int mn, int k) {
    const uint32_t a = swizzle_addr(
        s.start + canonical_offset(mn_major, s.swizzle, 2, s.lbo, s.sbo, mn, k), s.swizzle);
    uint16_t h;
    std::memcpy(&h, smem_at(a, 2, "wgmma operand outside the block's shared memory"), 2);
    if (g_unfenced[a] || g_unfenced[a + 1]) {  // at the first issue, too: fences come before it
      fail("wgmma reads shared memory stored by a thread that has not executed fence.proxy.async");
    }
    bits.push_back(h);
  };
  const SmemDesc db = decode_desc(op.desc_b);
  check_desc(db);
  if (!op.a_in_regs) {
    const SmemDesc da = decode_desc(op.desc_a);
    check_desc(da);
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < 16; ++k) take(da, op.trans_a, m, k);
    }
  }
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < op.n; ++n) take(db, op.trans_b, n, k);
  }
  return bits;
}

// The part of warp only_w of warpgroup wg.
inline void run_wgmma(const PendingOp& pending, int wg, int only_w) {
  const WgOp& op = pending.op;
  if (operand_bits(op) != pending.operand) {
    fail(
        "wgmma: a shared-memory operand changed between the first thread's issue and the "
        "product (writes not ordered before the wgmma by a barrier?)");
  }
  // The registers of the warp's threads must be as the ISA leaves them to the instruction until
  // it retires: A as issued, D as the previous in-flight wgmma on them left it (or as issued).
  for (int th = 32 * only_w; th < 32 * only_w + 32; ++th) {
    if (op.a_in_regs && std::memcmp(op.a_src[th], op.a_regs[th], 16) != 0) {
      fail("wgmma: A registers written while the wgmma reading them was in flight");
    }
    DShadow& sh = g_sm90_lanes[128 * wg + th].dshadow[op.d[th]];
    if (std::memcmp(sh.bits.data(), op.d[th], 2 * op.n) != 0) {
      fail("wgmma: accumulator registers written while a wgmma on them was in flight");
    }
  }
  double A[64][16], B[16][256];
  const SmemDesc db = decode_desc(op.desc_b);
  if (op.a_in_regs) {
    for (int th = 0; th < 128; ++th) {
      const int w = th / 32, g = (th % 32) / 4, t = th % 4;
      for (int i = 0; i < 4; ++i) {
        for (int h = 0; h < 2; ++h) {
          const uint16_t x = static_cast<uint16_t>(op.a_regs[th][i] >> (16 * h));
          A[16 * w + g + 8 * (i & 1)][2 * t + 8 * (i >> 1) + h] = b16_to_f(x, op.bf16);
        }
      }
    }
  } else {
    const SmemDesc da = decode_desc(op.desc_a);
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < 16; ++k) A[m][k] = desc_elem(da, op.trans_a, op.bf16, m, k);
    }
  }
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < op.n; ++n) B[k][n] = desc_elem(db, op.trans_b, op.bf16, n, k);
  }
  for (int th = 32 * only_w; th < 32 * only_w + 32; ++th) {
    const int w = th / 32, g = (th % 32) / 4, t = th % 4;
    for (int j = 0; j < op.n / 2; ++j) {
      const int m = 16 * w + g + 8 * ((j % 4) >> 1), n = 8 * (j / 4) + 2 * t + (j & 1);
      double acc = op.scale_d ? op.d[th][j] : 0.0;
      for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      op.d[th][j] = static_cast<float>(acc);
    }
    auto& fenced = g_sm90_lanes[128 * wg + th].at_fence;
    if (auto it = fenced.find(op.d[th]); it != fenced.end() && it->second.size() == 2u * op.n) {
      std::memcpy(it->second.data(), op.d[th], 2 * op.n);
    }
    auto& shadows = g_sm90_lanes[128 * wg + th].dshadow;
    DShadow& sh = shadows[op.d[th]];
    if (--sh.in_flight == 0) {
      shadows.erase(op.d[th]);
    } else {
      std::memcpy(sh.bits.data(), op.d[th], 2 * op.n);
    }
  }
}

inline Sm90Lane& me90() {
  if (g_sm90_lanes.size() != g_block->lanes.size()) fail("sm90 emulator not installed");
  return g_sm90_lanes[g_block->cur];
}

inline Sm90Group& my_group() {
  if (g_block->lanes.size() % 128) fail("warpgroup instruction in a block of partial warpgroups");
  return g_sm90_groups[g_block->cur / 128];
}

// ---- the hooks the kernel calls ---------------------------------------------------------------
// wgmma.fence, per thread: later wgmmas may touch registers written before it.
IDDPM_EMU_NOINLINE inline void wgmma_fence() {
  my_group();
  Sm90Lane& l = me90();
  l.need_fence = false;
  l.at_fence.clear();
  for (const auto& [p, bytes] : l.operands) {
    const auto* b = static_cast<const unsigned char*>(p);
    l.at_fence[p].assign(b, b + bytes);
  }
  yield(St::run);
}

// The ISA's rule for wgmma.fence: a thread's register accesses must be fenced from a later wgmma
// that accesses the same registers. An operand array written since the fence (other than by the
// products) is refused at the first wgmma of the batch that accesses it (later ones in the batch
// are covered by the in-flight checks).
inline void check_since_fence(Sm90Lane& l, const void* p, size_t bytes) {
  auto it = l.at_fence.find(p);
  if (it != l.at_fence.end()) {
    if (it->second.size() != bytes || std::memcmp(it->second.data(), p, bytes) != 0) {
      fail("wgmma: registers written between wgmma.fence and a wgmma that accesses them");
    }
    l.at_fence.erase(it);
  }
  l.operands[p] = bytes;
}

// wgmma.commit_group, per thread: the thread's wgmmas issued since its last commit form a group.
IDDPM_EMU_NOINLINE inline void wgmma_commit() {
  Sm90Lane& l = me90();
  my_group();
  if (l.issued != l.committed) l.groups.push_back(l.issued);  // an empty group retires at once
  l.committed = l.issued;
  yield(St::run);
}

// wgmma.wait_group N, per thread: all but the newest N of the thread's committed groups retire;
// this thread spins until its warp's parts of their instructions have run (sm90_async runs
// them).
IDDPM_EMU_NOINLINE inline void wgmma_wait(int n) {
  Sm90Group& grp = my_group();
  while (static_cast<int>(me90().groups.size()) > n) {
    const uint64_t end = me90().groups.front();
    const int w = (g_block->cur % 128) / 32;
    ++grp.waiting[w];
    while (grp.wbase[w] < end) yield(St::spin);  // parts not all run
    --grp.waiting[w];
    me90().groups.pop_front();
  }
  me90().need_fence = true;
  ++g_events;
  yield(St::run);
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}, this thread's part: A from a descriptor
// (a_regs null) or registers, B from a descriptor; d: this thread's N/2 accumulators.
IDDPM_EMU_NOINLINE inline void wgmma(int n, bool bf16, float* d, uint64_t desc_a,
                                     const uint32_t* a_regs, uint64_t desc_b, bool scale_d,
                                     bool trans_a, bool trans_b) {
  if (n < 8 || n > 256 || n % 8) fail("wgmma: N not a multiple of 8 in [8, 256]");
  Sm90Group& grp = my_group();
  Sm90Lane& l = me90();
  if (l.need_fence) fail("wgmma.mma_async without wgmma.fence since the last wait");
  const uint64_t seq = l.issued++;
  if (seq < grp.base) fail("wgmma: issue order lost");
  while (grp.ops.size() <= seq - grp.base) grp.ops.emplace_back();
  PendingOp& o = grp.ops[seq - grp.base];
  WgOp mine;
  mine.n = n;
  mine.bf16 = bf16;
  mine.a_in_regs = a_regs != nullptr;
  mine.trans_a = trans_a;
  mine.trans_b = trans_b;
  mine.scale_d = scale_d;
  mine.desc_a = desc_a;
  mine.desc_b = desc_b;
  if (o.parts == 0) {  // the first thread to issue it: the instruction and its operands as seen now
    o.lazy = coin();
    o.op = mine;
    o.operand = operand_bits(mine);
  } else {
    const WgOp& op = o.op;
    if (mine.n != op.n || mine.bf16 != op.bf16 || mine.a_in_regs != op.a_in_regs ||
        mine.trans_a != op.trans_a || mine.trans_b != op.trans_b || mine.scale_d != op.scale_d ||
        mine.desc_b != op.desc_b || (!op.a_in_regs && mine.desc_a != op.desc_a)) {
      fail("wgmma: threads of the warpgroup disagree on the instruction or its descriptors");
    }
  }
  const int th = g_block->cur % 128;
  for (int r = 0; r < 4; ++r) o.op.a_regs[th][r] = a_regs ? a_regs[r] : 0;
  o.op.a_src[th] = a_regs;
  o.op.d[th] = d;
  check_since_fence(l, d, 2 * n);
  if (a_regs) check_since_fence(l, a_regs, 16);
  DShadow& sh = l.dshadow[d];
  if (sh.in_flight++ == 0)
    sh.bits.assign(reinterpret_cast<const uint32_t*>(d),
                   reinterpret_cast<const uint32_t*>(d) + n / 2);
  ++o.parts;
  ++o.wparts[th / 32];
  ++g_events;
  yield(St::run);
}

inline Mbar& mbar_at(uint32_t a, bool must_be_init) {
  if (a % 8) fail("mbarrier not 8-byte aligned");
  smem_at(a, 8, "mbarrier outside the block's shared memory");
  auto it = g_mbars.find(a);
  if (it == g_mbars.end()) {
    if (must_be_init) fail("mbarrier used before mbarrier.init");
    it = g_mbars.emplace(a, Mbar{}).first;
  }
  return it->second;
}

IDDPM_EMU_NOINLINE inline void mbar_init(uint32_t a, uint32_t count) {
  if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init: count out of range");
  Mbar& b = mbar_at(a, false);
  b.expected = b.pending = count;
  b.phase = 0;
  ++g_events;
}

// The current phase completes once every expected arrival is in and no transaction bytes are
// outstanding: phase + 1, pending = expected, tx = 0.
inline void mbar_maybe_complete(Mbar& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
}

// mbarrier.arrive (with .expect_tx: tx-count += tx first).
IDDPM_EMU_NOINLINE inline void mbar_arrive(uint32_t a, uint32_t tx = 0) {
  if (me().unfenced_copies) {
    fail("mbarrier.arrive after cp.async data landed without fence.proxy.async");
  }
  Mbar& b = mbar_at(a, true);
  if (b.pending == 0) fail("mbarrier: more arrivals than its count");
  b.tx += tx;
  if (b.tx > (1 << 20) - 1) fail("mbarrier: tx-count out of range");
  --b.pending;
  mbar_maybe_complete(b);
  ++g_events;
}

// cuTensorMapEncodeTiled's documented requirements, for the case emulated here.
inline TensorMap2D encode_tensor_map_2d(const void* base, const uint64_t (&dim)[2],
                                        uint64_t stride1, const uint32_t (&box)[2], bool swizzle128,
                                        uint32_t elem = 2) {
  if (elem != 2 && elem != 4) fail("tensor map: element size other than 2 or 4 bytes");
  if (reinterpret_cast<uintptr_t>(base) % 16)
    fail("tensor map: global address not 16-byte aligned");
  if (stride1 % 16 || stride1 >= (1ull << 40)) fail("tensor map: stride not a multiple of 16");
  for (int i = 0; i < 2; ++i) {
    if (dim[i] == 0 || dim[i] > (1ull << 32)) fail("tensor map: dim out of range");
    if (box[i] == 0 || box[i] > 256) fail("tensor map: box dim out of range");
  }
  if ((box[0] * elem) % 16) fail("tensor map: inner box not a multiple of 16 bytes");
  if (swizzle128 && box[0] * elem != 128) {
    fail("tensor map: 128 B swizzle with an inner box other than 128 bytes is not emulated");
  }
  TensorMap2D m;
  m.base = base;
  m.dim[0] = dim[0];
  m.dim[1] = dim[1];
  m.stride1 = stride1;
  m.box[0] = box[0];
  m.box[1] = box[1];
  m.swizzle128 = swizzle128;
  m.elem = elem;
  return m;
}

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [dst],
// [map, {c0, c1}], [bar]: queued; it lands some rounds later (sm90_async), writing the box
// row after row (box[0] elements of 2 bytes each, row r at dst + r·box[0]·2, through the
// 128-byte swizzle of the shared address when the map has it), zeros where a coordinate is out of
// the tensor, then completes box bytes of transactions on bar.
IDDPM_EMU_NOINLINE inline void tma_load_2d(uint32_t dst, const TensorMap2D* m, int32_t c0,
                                           int32_t c1, uint32_t bar) {
  if (m->elem != 2) fail("TMA load: only 16-bit elements are emulated");
  if (dst % (m->swizzle128 ? 1024 : 128)) fail("TMA destination misaligned");
  smem_at(dst, static_cast<size_t>(m->box[0]) * m->box[1] * 2, "TMA box outside shared memory");
  mbar_at(bar, true);
  g_bulk.push_back({dst, bar, *m, c0, c1});
}

inline void run_bulk(const BulkCopy& c) {
  const TensorMap2D& m = c.map;
  for (uint32_t r = 0; r < m.box[1]; ++r) {
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const int64_t x = static_cast<int64_t>(c.c0) + e, y = static_cast<int64_t>(c.c1) + r;
      uint16_t v = 0;
      if (x >= 0 && y >= 0 && static_cast<uint64_t>(x) < m.dim[0] &&
          static_cast<uint64_t>(y) < m.dim[1]) {
        const auto* src = static_cast<const unsigned char*>(m.base) + y * m.stride1 + x * 2;
        if (!inside_global(src, 2)) fail("TMA reads outside every input buffer");
        std::memcpy(&v, src, 2);
      }
      uint32_t a = c.dst + (r * m.box[0] + e) * 2;
      if (m.swizzle128) a = swizzle_addr(a, 1);
      std::memcpy(const_cast<unsigned char*>(smem_at(a, 2, "TMA write")), &v, 2);
    }
  }
  Mbar& b = mbar_at(c.bar, true);
  b.tx -= static_cast<int64_t>(m.box[0]) * m.box[1] * 2;
  mbar_maybe_complete(b);
  ++g_events;
}

// Shared-window address of element (row r, element e) of a box at src (through the swizzle).
inline uint32_t box_addr(uint32_t src, const TensorMap2D& m, uint32_t r, uint32_t e) {
  const uint32_t a = src + (r * m.box[0] + e) * m.elem;
  return m.swizzle128 ? swizzle_addr(a, 1) : a;
}

// The box's shared-memory source, byte by byte in box order; refused where a byte was stored
// through st_shared by a thread that has not fenced it into the async proxy.
inline std::vector<unsigned char> reduce_source(uint32_t src, const TensorMap2D& m) {
  std::vector<unsigned char> bytes;
  for (uint32_t r = 0; r < m.box[1]; ++r) {
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const uint32_t a = box_addr(src, m, r, e);
      const unsigned char* p = smem_at(a, m.elem, "TMA reduction source outside shared memory");
      for (uint32_t i = 0; i < m.elem; ++i) {
        if (g_unfenced[a + i]) {
          fail(
              "TMA reduction reads shared memory stored by a thread that has not executed "
              "fence.proxy.async");
        }
        bytes.push_back(p[i]);
      }
    }
  }
  return bytes;
}

// Counts a reduction's source bytes busy (+1 at its issue) or free again (-1 when its issuing
// thread's wait retires it).
inline void mark_reduce_source(const BulkReduce& op, int delta) {
  for (uint32_t r = 0; r < op.map.box[1]; ++r) {
    for (uint32_t e = 0; e < op.map.box[0]; ++e) {
      const uint32_t a = box_addr(op.src, op.map, r, e);
      for (uint32_t i = 0; i < op.map.elem; ++i) g_reduce_busy[a + i] += delta;
    }
  }
}

// cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [map, {c0, c1}], [src]
// (fp32 elements): queued; it runs later (sm90_async).
IDDPM_EMU_NOINLINE inline void tma_reduce_add_2d(uint32_t src, const TensorMap2D* m, int32_t c0,
                                                 int32_t c1) {
  if (m->elem != 4) fail("TMA reduction: only fp32 add is emulated");
  if (src % (m->swizzle128 ? 1024 : 128)) fail("TMA reduction source misaligned");
  Sm90Lane& l = me90();
  g_reduce.push_back(
      {src, *m, c0, c1, g_block->cur, l.bulk_issued++, coin(), reduce_source(src, *m)});
  mark_reduce_source(g_reduce.back(), 1);
  ++g_events;
  yield(St::run);
}

inline void run_reduce(const BulkReduce& op) {
  const TensorMap2D& m = op.map;
  if (reduce_source(op.src, m) != op.source) {
    fail(
        "TMA reduction: its shared-memory source changed between the issue and the read "
        "(overwritten before cp.async.bulk.wait_group.read retired it?)");
  }
  for (uint32_t r = 0; r < m.box[1]; ++r) {
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const int64_t x = static_cast<int64_t>(op.c0) + e, y = static_cast<int64_t>(op.c1) + r;
      if (x < 0 || y < 0 || static_cast<uint64_t>(x) >= m.dim[0] ||
          static_cast<uint64_t>(y) >= m.dim[1]) {
        continue;  // outside the tensor: skipped
      }
      auto* dst = static_cast<unsigned char*>(const_cast<void*>(m.base)) + y * m.stride1 + x * 4;
      if (!inside_global(dst, 4)) fail("TMA reduction writes outside every registered buffer");
      float v, acc;
      std::memcpy(&v, smem_at(box_addr(op.src, m, r, e), 4, "TMA reduction source"), 4);
      std::memcpy(&acc, dst, 4);
      acc += v;
      std::memcpy(dst, &acc, 4);
    }
  }
  ++g_events;
}

// cp.async.bulk.commit_group, per thread.
IDDPM_EMU_NOINLINE inline void bulk_commit() {
  Sm90Lane& l = me90();
  if (l.bulk_issued != l.bulk_committed) l.bulk_groups.push_back(l.bulk_issued);
  l.bulk_committed = l.bulk_issued;
  yield(St::run);
}

// cp.async.bulk.wait_group{.read} N, per thread: spins until all but its newest N committed
// groups have run (reads and writes happen together here).
IDDPM_EMU_NOINLINE inline void bulk_wait(int n) {
  const int me_id = g_block->cur;
  while (static_cast<int>(me90().bulk_groups.size()) > n) {
    const uint64_t end = me90().bulk_groups.front();
    auto pending = [&] {
      for (const BulkReduce& op : g_reduce) {
        if (op.lane == me_id && op.seq < end && !op.done) return true;
      }
      return false;
    };
    me90().bulk_waiting = true;
    while (pending()) yield(St::spin);
    me90().bulk_waiting = false;
    me90().bulk_groups.pop_front();
    for (size_t i = 0; i < g_reduce.size();) {  // retired: their sources may be written again
      if (g_reduce[i].lane == me_id && g_reduce[i].seq < end) {
        mark_reduce_source(g_reduce[i], -1);
        g_reduce.erase(g_reduce.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }
  ++g_events;
  yield(St::run);
}

// Runs each warp's part of its oldest wgmma whose 32 threads have all issued it, with
// probability 1/4 per round (every such part when `all`), in issue order per warp; a wgmma
// whose four parts have run is dropped. Half the wgmmas (at random) are lazy: a part of one runs
// only while a thread of its warp spins in wait_group, with probability 1/8 per round, so that
// products stay in flight long after their issue (as slow tensor cores would keep them) and a
// tile released or rewritten before the wait that retires its readers shows. Returns whether any
// part ready to run is left.
inline bool run_ready_wgmmas(bool all) {
  bool left = false;
  for (size_t wg = 0; wg < g_sm90_groups.size(); ++wg) {
    Sm90Group& grp = g_sm90_groups[wg];
    for (int w = 0; w < 4; ++w) {
      for (;;) {
        const uint64_t idx = grp.wbase[w] - grp.base;
        if (idx >= grp.ops.size() || grp.ops[idx].wparts[w] != 32) break;
        const bool may =
            grp.ops[idx].lazy ? grp.waiting[w] > 0 && coin() && coin() && coin() : coin() && coin();
        if (!all && !may) {
          left = true;
          break;
        }
        run_wgmma(grp.ops[idx], static_cast<int>(wg), w);
        grp.ops[idx].wdone[w] = true;
        ++grp.wbase[w];
        ++g_events;
      }
    }
    while (!grp.ops.empty() && grp.ops.front().wdone[0] && grp.ops.front().wdone[1] &&
           grp.ops.front().wdone[2] && grp.ops.front().wdone[3]) {
      grp.ops.pop_front();
      ++grp.base;
    }
  }
  return left;
}

// Lands each TMA copy in flight with probability 1/4 per round (all of them when `all`), and
// runs the ready wgmmas likewise.
inline bool sm90_async(bool all) {
  const bool wgmma_left = run_ready_wgmmas(all);
  for (size_t i = 0; i < g_bulk.size();) {
    if (all || (coin() && coin())) {
      const BulkCopy c = g_bulk[i];
      g_bulk.erase(g_bulk.begin() + static_cast<std::ptrdiff_t>(i));
      run_bulk(c);
    } else {
      ++i;
    }
  }
  // TMA reductions: each runs with probability 1/4 per round once committed (a lazy one only
  // while its thread waits for it), in issue order per thread. A round that must make progress
  // (`all`) runs only those some thread waits for: nothing else needs them, and draining every
  // reduction whenever all threads spin would hide a source overwritten before its wait.
  std::vector<int> blocked;  // threads whose older reduction has not run this round
  for (BulkReduce& op : g_reduce) {
    if (op.done) continue;
    const Sm90Lane& l = g_sm90_lanes[op.lane];
    const bool committed = op.seq < l.bulk_committed;
    const bool earlier_waits = std::find(blocked.begin(), blocked.end(), op.lane) != blocked.end();
    const bool may = op.lazy ? l.bulk_waiting && coin() : coin() && coin();
    if (committed && !earlier_waits && ((all && l.bulk_waiting) || may)) {
      run_reduce(op);
      op.done = true;
    } else {
      blocked.push_back(op.lane);
    }
  }
  bool awaited = false;  // reductions nobody waits for cannot unblock a deadlocked round
  for (const BulkReduce& op : g_reduce) {
    awaited = awaited || (!op.done && g_sm90_lanes[op.lane].bulk_waiting);
  }
  return wgmma_left || !g_bulk.empty() || awaited;
}

IDDPM_EMU_NOINLINE inline bool mbar_try_wait_parity(uint32_t a, uint32_t parity) {
  return (mbar_at(a, true).phase & 1) != (parity & 1);
}

// Spins (letting every other thread run) until the phase of `parity` has completed.
IDDPM_EMU_NOINLINE inline void mbar_wait_parity(uint32_t a, uint32_t parity) {
  while (!mbar_try_wait_parity(a, parity)) yield(St::spin);
}

IDDPM_EMU_NOINLINE inline void fence_proxy_async() {
  me().unfenced_copies = false;
  for (uint32_t a : me90().unfenced) g_unfenced[a] = 0;
  me90().unfenced.clear();
}

// A generic store of `bytes` bytes to shared memory that a wgmma will read (st.shared): the
// bytes stay unfenced until this thread's next fence.proxy.async.
IDDPM_EMU_NOINLINE inline void st_shared(void* p, const void* src, size_t bytes) {
  check_smem(p, bytes, "st.shared outside the block's shared memory");
  const uint32_t a = smem_offset(p);
  for (size_t i = 0; i < bytes; ++i) {
    if (g_reduce_busy[a + i]) {
      fail(
          "st.shared to the source of a TMA reduction that its issuing thread has not retired "
          "(cp.async.bulk.wait_group.read) yet");
    }
  }
  std::memcpy(p, src, bytes);
  for (size_t i = 0; i < bytes; ++i) {
    g_unfenced[a + i] = 1;
    me90().unfenced.push_back(static_cast<uint32_t>(a + i));
  }
}

// Named barriers (bar.sync / bar.arrive id, n; PTX ISA 9.7.13.1): an arrival counts one thread
// (a warp's 32 threads arrive together on the GPU, which per-thread counting matches when every
// thread of a warp executes it); the barrier completes when n threads have arrived, releasing
// the threads waiting in bar.sync, and starts over. Arrivals left over at the block's end are
// allowed (a ping-pong's last bar.arrive has no partner).
inline uint64_t named_bar_arrival(int id, int n) {
  if (id < 1 || id > 15) fail("named barrier id out of range (1..15; 0 is __syncthreads's)");
  if (n <= 0 || n % 32 || n > static_cast<int>(g_block->lanes.size())) {
    fail("named barrier: thread count not a multiple of 32 within the block");
  }
  NamedBar& b = g_named[id];
  if (b.arrived > 0 && b.expected != n) fail("named barrier: threads disagree on its count");
  b.expected = n;
  const uint64_t gen = b.generation;
  if (++b.arrived == n) {
    b.arrived = 0;
    ++b.generation;
  }
  ++g_events;
  return gen;
}

IDDPM_EMU_NOINLINE inline void named_bar_sync(int id, int n) {
  const uint64_t gen = named_bar_arrival(id, n);
  while (g_named[id].generation == gen) yield(St::spin);
  ++g_events;
  yield(St::run);
}

IDDPM_EMU_NOINLINE inline void named_bar_arrive(int id, int n) {
  named_bar_arrival(id, n);
  yield(St::run);
}

inline const Sm90Install g_sm90_install{};

}  // namespace attn_emu

// tests/ops/cuda_emulation/attention_sm90_emulation.cpp — runs the Hopper forward kernel
// (csrc/cuda/attention_fwd_sm90.cuh, unchanged) on the CPU through sm90_emulator.h and checks
// it against float64, after unit checks of the emulator itself against the PTX ISA:
//  * the swizzle patterns (hand-written rows of the 128 B table, 64 B / 32 B addresses);
//  * the canonical layouts against the ISA's worked examples (9.7.15.5.1.2.1.3), each evaluated
//    here from its CuTe shape : stride by a small independent evaluator;
//  * descriptor decoding (the examples' LBO / SBO encodings);
//  * mbarrier phases and parity waits;
//  * single wgmma products on shared memory filled by hand in the layouts the kernel's
//    producer writes (M- / N-major with imm-trans = 1, K-major with a start inside the 128-byte
//    row, A from registers), exact on small integers.
// Then the kernel: fp16 / bf16, C = 64 / 128, T masked (37: guarded loads; 200: TMA and
// cp.async) and whole (128, 384, 1024: several rounds of both stages), B, H > 1, unaligned
// storage; the TMA producer, and the cp.async / guarded one the launcher takes otherwise. Built and
// run by tests/ops/test_attention_sm90_emulation.py. Exit code 0 = pass.
//
// `attention_sm90_emulation --refuse WHAT` runs one misuse the emulator must refuse (exit 3 with
// its message): base-offset, no-fence, unwaited, no-proxy-fence, no-store-fence, acc-in-flight,
// a-regs-in-flight, write-after-fence, pingpong-no-start.
//
// What it cannot check: that the hardware follows the ISA as read here (layouts, descriptor
// fields, the proxy rules), register allocation (setmaxnreg), timing, and anything between CTAs.
#include "sm90_emulator.h"  // first: the emulation hooks and CUDA built-ins

#include <algorithm>
#include <random>
#include <string>

#include "attention_reference.h"
#include "cuda/attention_bwd_kernel.cuh"
#include "cuda/attention_bwd_sm90.cuh"
#include "cuda/attention_fwd_sm90.cuh"

namespace iddpm::cuda::attn_sm90 {
alignas(1024) unsigned char smem_raw[256 * 1024];
}

using iddpm::cuda::attn_dev::Elem;
using iddpm::cuda::attn_sm90::smem_raw;
using iddpm::cuda::attn_sm90::tma_params;
using iddpm::cuda::attn_sm90::tma_usable;
using iddpm::cuda::attn_sm90::TmaMap;
using iddpm::cuda::attn_sm90::TmaParams;

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++g_failures;
  }
}

// ---- emulator unit checks ---------------------------------------------------------------------
void check_swizzle() {
  using attn_emu::swizzle_addr;
  // 128 B: 16-byte chunk c of row r (128-byte rows) lands at chunk c ^ (r % 8). Rows written out.
  const int rows[4][8] = {{0, 1, 2, 3, 4, 5, 6, 7},
                          {1, 0, 3, 2, 5, 4, 7, 6},
                          {5, 4, 7, 6, 1, 0, 3, 2},
                          {7, 6, 5, 4, 3, 2, 1, 0}};
  const int row_of[4] = {0, 1, 5, 7};
  bool ok = true;
  for (int i = 0; i < 4; ++i) {
    for (int c = 0; c < 8; ++c) {
      for (int rep : {0, 1024, 4096}) {  // the pattern repeats every 1024 bytes
        const uint32_t a = rep + row_of[i] * 128 + c * 16;
        ok = ok && swizzle_addr(a + 6, 1) == rep + row_of[i] * 128 + rows[i][c] * 16 + 6u;
      }
    }
  }
  // 64 B: bits 4-5 ^= bits 7-8 (repeat 512); 32 B: bit 4 ^= bit 7 (repeat 256); none: identity.
  ok = ok && swizzle_addr(0x80, 2) == 0x90 && swizzle_addr(0x180, 2) == 0x1B0 &&
       swizzle_addr(0x230, 2) == 0x230 && swizzle_addr(0x1F0, 2) == 0x1C0;
  ok = ok && swizzle_addr(0x80, 3) == 0x90 && swizzle_addr(0x90, 3) == 0x80 &&
       swizzle_addr(0x100, 3) == 0x100 && swizzle_addr(0x1B0, 3) == 0x1A0;
  ok = ok && swizzle_addr(0x3F0, 0) == 0x3F0;
  std::printf("unit: swizzle patterns %s\n", ok ? "ok" : "WRONG");
  expect(ok, "swizzle patterns");
}

// A CuTe layout of two top-level modes, each a list of (size, stride), evaluated at (mn, k):
// the index along a mode is split colexicographically (first sub-mode fastest).
struct Mode {
  std::vector<int> size, stride;
  int eval(int x) const {
    int off = 0;
    for (size_t i = 0; i < size.size(); ++i) {
      off += (x % size[i]) * stride[i];
      x /= size[i];
    }
    return off;
  }
  int extent() const {
    int n = 1;
    for (int s : size) n *= s;
    return n;
  }
};

// The ISA's examples (9.7.15.5.1.2.1.3): exact layout, element size, swizzle code, LBO / SBO in
// bytes; canonical_offset (bytes) / element size must equal the exact layout's offset.
void check_canonical_layouts() {
  struct Example {
    const char* name;
    bool mn_major;
    int code, eb;
    uint32_t lbo, sbo;
    Mode mn, k;
    int k_limit;  // K-major swizzled: one instruction's K (the 32-byte span it reads)
  };
  const Example ex[] = {
      {"K none tf32", false, 0, 4, 64 * 4, 32 * 4, {{8, 2}, {4, 32}}, {{4, 4}, {1, 64}}, 16},
      {"K 32B tf32", false, 3, 4, 16, 64 * 4, {{8, 2}, {8, 64}}, {{4, 4}, {1, 4}}, 8},
      {"MN none bf16",
       true,
       0,
       2,
       128 * 2,
       64 * 2,
       {{8, 1, 2}, {1, 8, 64}},
       {{8, 2}, {8, 128}},
       16},
      {"MN 32B bf16",
       true,
       3,
       2,
       128 * 2,
       256 * 2,
       {{8, 2, 2}, {1, 8, 128}},
       {{8, 2}, {16, 256}},
       16},
      {"MN 64B bf16",
       true,
       2,
       2,
       256 * 2,
       512 * 2,
       {{8, 4, 2}, {1, 8, 256}},
       {{8, 2}, {32, 512}},
       16},
  };
  for (const Example& e : ex) {
    bool ok = true;
    for (int mn = 0; mn < e.mn.extent(); ++mn) {
      for (int k = 0; k < std::min(e.k.extent(), e.k_limit); ++k) {
        const uint32_t got =
            attn_emu::canonical_offset(e.mn_major, e.code, e.eb, e.lbo, e.sbo, mn, k);
        ok = ok && got == static_cast<uint32_t>((e.mn.eval(mn) + e.k.eval(k)) * e.eb);
      }
    }
    std::printf("unit: canonical layout %-13s %s\n", e.name, ok ? "ok" : "WRONG");
    expect(ok, std::string("canonical layout ") + e.name);
  }
}

void check_descriptor() {
  // The first example's encodings (LBO 16, SBO 8), a start address, 128 B swizzle.
  const uint64_t d = (0x2400ull >> 4) | (16ull << 16) | (8ull << 32) | (1ull << 62);
  const attn_emu::SmemDesc s = attn_emu::decode_desc(d);
  const bool ok = s.start == 0x2400 && s.lbo == 256 && s.sbo == 128 && s.base_offset == 0 &&
                  s.swizzle == 1 && attn_emu::swizzle_width(s.swizzle) == 8;
  // The kernel's own encoder gives the same fields.
  const uint64_t k = iddpm::cuda::attn_sm90::sw128_desc(0x2400, 256, 128);
  std::printf("unit: descriptor fields %s\n", ok && k == d ? "ok" : "WRONG");
  expect(ok && k == d, "descriptor decoding");
}

void check_mbarrier() {
  bool ok = true;
  attn_emu::run_block(128, smem_raw, sizeof(smem_raw), [&] {
    const uint32_t bar = attn_emu::smem_offset(smem_raw + 64);
    if (threadIdx.x == 0) {
      attn_emu::mbar_init(bar, 2);
      ok = ok && !attn_emu::mbar_try_wait_parity(bar, 0) && attn_emu::mbar_try_wait_parity(bar, 1);
      attn_emu::mbar_arrive(bar);
      ok = ok && !attn_emu::mbar_try_wait_parity(bar, 0);
      attn_emu::mbar_arrive(bar);  // phase 0 completes
      ok = ok && attn_emu::mbar_try_wait_parity(bar, 0) && !attn_emu::mbar_try_wait_parity(bar, 1);
      attn_emu::mbar_arrive(bar);
      attn_emu::mbar_arrive(bar);  // phase 1 completes
      ok = ok && attn_emu::mbar_try_wait_parity(bar, 1) && !attn_emu::mbar_try_wait_parity(bar, 0);
    }
    __syncthreads();
    // 127 threads wait for phase 2, which thread 5 completes with two arrivals later on.
    if (threadIdx.x == 5) {
      attn_emu::mbar_arrive(bar);
      attn_emu::mbar_arrive(bar);
    } else if (threadIdx.x != 0) {
      attn_emu::mbar_wait_parity(bar, 0);
    }
  });
  std::printf("unit: mbarrier phases %s\n", ok ? "ok" : "WRONG");
  expect(ok, "mbarrier phases");
}

// Two wgmma products on hand-filled shared memory (small integers: exact in fp32).
void check_wgmma() {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> small(-6, 6);
  static float A[64][16], B[16][128], V[16][64];
  for (auto& r : A)
    for (float& x : r) x = static_cast<float>(small(rng));
  for (auto& r : B)
    for (float& x : r) x = static_cast<float>(small(rng));
  for (auto& r : V)
    for (float& x : r) x = static_cast<float>(small(rng));
  auto put = [](uint32_t byte, float x) {
    const __half h = __float2half_rn(x);
    std::memcpy(smem_raw + byte, &h, 2);
  };
  double err_ss = 0, err_rs = 0;
  attn_emu::run_block(128, smem_raw, sizeof(smem_raw), [&] {
    if (threadIdx.x == 0) {
      // A (64 × 16) M-major: row k holds m = 0..63 (128 bytes), chunk swizzled by k % 8.
      for (int k = 0; k < 16; ++k)
        for (int m = 0; m < 64; ++m) put(k * 128 + ((2 * m) ^ ((k % 8) << 4)), A[m][k]);
      // B (16 × 128) N-major at 4096: blocks of 64 n 2048 bytes apart, row k of each 128 bytes.
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 128; ++n)
          put(4096 + (n / 64) * 2048 + k * 128 + ((2 * (n % 64)) ^ ((k % 8) << 4)), B[k][n]);
      // V (16 keys × 64 channels) K-major at 8192: row n (channel) holds keys 16..31 of a
      // 64-key row (bytes 32..63), the 16-byte chunks swizzled by n % 8.
      for (int n = 0; n < 64; ++n)
        for (int k = 0; k < 16; ++k)
          put(8192 + n * 128 + ((2 * (k + 16)) ^ ((n % 8) << 4)), V[k][n]);
    }
    __syncthreads();
    using namespace iddpm::cuda::attn_sm90;
    const int w = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    float d[64], o[32];
    for (float& x : d) x = 1.0f;  // overwritten: scale-d = 0
    for (float& x : o) x = 0.5f;  // accumulated onto
    uint32_t a[4];
    for (int i = 0; i < 4; ++i) {
      const int m = 16 * w + g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
      a[i] = Elem<__half>::pack(A[m][k], A[m][k + 1]);
    }
    wgmma_fence();
    wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), false);
    wgmma_rs_k<64, false>(o, a, sw128_desc(8192 + 32, 16, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    for (int j = 0; j < 64; ++j) {
      const int m = 16 * w + g + 8 * ((j % 4) >> 1), n = 8 * (j / 4) + 2 * t + (j & 1);
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += static_cast<double>(A[m][k]) * B[k][n];
      err_ss = std::max(err_ss, std::fabs(ref - d[j]));
      if (j < 32) {
        double r2 = 0.5;
        for (int k = 0; k < 16; ++k) r2 += static_cast<double>(A[m][k]) * V[k][n];
        err_rs = std::max(err_rs, std::fabs(r2 - o[j]));
      }
    }
  });
  std::printf("unit: wgmma ss (M/N-major) error %.1f, rs (K-major) error %.1f\n", err_ss, err_rs);
  expect(err_ss == 0 && err_rs == 0, "wgmma products on hand-written layouts");
}

// Two warpgroups taking turns through two named barriers (the pipelined forward's ping-pong):
// every thread logs its warpgroup inside its turn; the log must alternate in runs of 128.
void check_named_barriers() {
  std::vector<int> log;
  attn_emu::run_block(256, smem_raw, sizeof(smem_raw), [&] {
    using namespace iddpm::cuda::attn_sm90;
    const int wg = threadIdx.x / 128;
    if (wg == 1) named_bar_arrive(1, 256);  // warpgroup 0 goes first
    for (int turn = 0; turn < 5; ++turn) {
      named_bar_sync(1 + wg, 256);
      log.push_back(wg);
      named_bar_arrive(2 - wg, 256);
    }
  });
  bool ok = log.size() == 10 * 128;
  for (size_t i = 0; ok && i < log.size(); ++i) ok = log[i] == static_cast<int>((i / 128) % 2);
  std::printf("unit: named barriers (ping-pong order) %s\n", ok ? "ok" : "WRONG");
  expect(ok, "named barriers");
}

// A TMA reduction of one [64 rows × 32 fp32] box, written into shared memory by hand through the
// 128-byte swizzle (16-byte chunk p / 4 of row r at chunk (p / 4) ^ (r % 8)), into a [70, 40]
// tensor at (positions 20.., rows 10..): elements past position 39 or row 69 are skipped, the
// others added, the rest of the tensor untouched.
void check_tma_reduce() {
  using namespace iddpm::cuda::attn_sm90;
  constexpr int kT = 40, kRows = 70, c0 = 20, c1 = 10;
  std::vector<float> g(kRows * kT);
  for (int i = 0; i < kRows * kT; ++i) g[i] = static_cast<float>(i);
  auto value = [](int r, int p) { return 0.25f * static_cast<float>(r) + 100.0f * p; };
  attn_emu::g_global = {{g.data(), g.size() * sizeof(float)}};
  const uint64_t dim[2] = {kT, kRows};
  const uint32_t box[2] = {32, 64};
  const TmaMap map = attn_emu::encode_tensor_map_2d(g.data(), dim, kT * 4, box, true, 4);
  attn_emu::run_block(128, smem_raw, sizeof(smem_raw), [&] {
    const int tid = threadIdx.x;
    for (int idx = tid; idx < 64 * 16; idx += 128) {  // (row, pair of positions)
      const int r = idx / 16, p = 2 * (idx % 16);
      const uint32_t a = r * 128 + (((p / 4) ^ (r % 8)) << 4) + 4 * (p % 4);
      st_shared_f32x2(a, value(r, p), value(r, p + 1));
    }
    fence_proxy_async();
    __syncthreads();
    if (tid == 0) {
      tma_reduce_add_2d(&map, c0, c1, 0);
      bulk_commit();
      bulk_wait<0>();
    }
  });
  bool ok = true;
  for (int y = 0; y < kRows; ++y) {
    for (int x = 0; x < kT; ++x) {
      const bool in_box = x >= c0 && x < c0 + 32 && y >= c1 && y < c1 + 64;
      const float want = static_cast<float>(y * kT + x) + (in_box ? value(y - c1, x - c0) : 0.0f);
      ok = ok && g[y * kT + x] == want;
    }
  }
  std::printf("unit: TMA reduction (swizzled box, bounds) %s\n", ok ? "ok" : "WRONG");
  expect(ok, "TMA reduction");
}

// ---- misuse the emulator must refuse (exit 3) ---------------------------------------------------
int refuse(const std::string& what) {
  using namespace iddpm::cuda::attn_sm90;
  const unsigned threads = what == "pingpong-no-start" ? 256 : 128;
  attn_emu::run_block(threads, smem_raw, sizeof(smem_raw), [&] {
    float d[64] = {};
    if (what == "base-offset") {
      wgmma_fence();
      wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024) | (1ull << 49),
                              sw128_desc(4096, 2048, 1024), false);
      wgmma_commit();
      wgmma_wait<0>();
    } else if (what == "no-fence") {
      wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), false);
    } else if (what == "unwaited") {
      wgmma_fence();
      wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), false);
      wgmma_commit();
    } else if (what == "no-proxy-fence") {
      static __half src[8];
      attn_emu::g_global = {{src, sizeof(src)}};
      const uint32_t bar = attn_emu::smem_offset(smem_raw + 65536);
      if (threadIdx.x == 0) attn_emu::mbar_init(bar, 128);
      __syncthreads();
      iddpm::cuda::attn_dev::cp_async_16(smem_raw + 16 * threadIdx.x, src, true);
      iddpm::cuda::attn_dev::cp_async_wait_all();
      attn_emu::mbar_arrive(bar);
    } else if (what == "acc-in-flight") {  // accumulators written before the wait
      // A chain of products on them, as the kernels issue (some still in flight at the write).
      wgmma_fence();
      for (int i = 0; i < 8; ++i) {
        wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), i > 0);
      }
      wgmma_commit();
      d[5] = 2.0f;
      wgmma_wait<0>();
    } else if (what == "a-regs-in-flight") {  // register A rewritten before the wait
      uint32_t a[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};
      float o[32] = {};
      wgmma_fence();
      for (int i = 0; i < 8; ++i) wgmma_rs_k<64, false>(o, a, sw128_desc(8192, 16, 1024));
      wgmma_commit();
      a[2] = 0;
      wgmma_wait<0>();
    } else if (what == "write-after-fence") {  // accumulators written after the batch's fence
      for (int round = 0; round < 2; ++round) {
        wgmma_fence();
        if (round == 1) d[3] = 1.0f;
        wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), true);
        wgmma_commit();
        wgmma_wait<0>();
      }
    } else if (what == "pingpong-no-start") {  // nobody arrives first: both wait forever
      if (threadIdx.x < 128) {
        named_bar_sync(1, 256);
        named_bar_arrive(2, 256);
      } else {
        named_bar_sync(2, 256);
        named_bar_arrive(1, 256);
      }
    } else if (what.rfind("reduce-", 0) == 0) {  // TMA reductions of 8 boxes from 8 buffers
      static float dst[64 * 32];
      attn_emu::g_global = {{dst, sizeof(dst)}};
      const uint64_t dim[2] = {32, 64};
      const uint32_t box[2] = {32, 64};
      const TmaMap map = attn_emu::encode_tensor_map_2d(dst, dim, 128, box, true, 4);
      for (int b = 0; b < 8; ++b) {
        for (int i = 0; i < 16; ++i)
          st_shared_f32x2(8192 * b + 64 * threadIdx.x + 4 * i, 1.0f, 2.0f);
      }
      if (what != "reduce-unfenced") fence_proxy_async();
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int b = 0; b < 8; ++b) tma_reduce_add_2d(&map, 0, 0, 8192 * b);
        bulk_commit();
        if (what == "reduce-overwritten") {  // the sources rewritten before the wait
          for (int b = 0; b < 8; ++b) st_shared_f32x2(8192 * b, 3.0f, 4.0f);
          fence_proxy_async();
        }
        if (what != "reduce-unwaited") bulk_wait_read<0>();
      }
    } else if (what == "no-store-fence") {  // dSᵀ-like stores read by wgmma without the fence
      const uint32_t v = 0x3C003C00u;       // two fp16 ones
      for (int i = 0; i < 4; ++i) st_shared_b32(smem_raw + 4096 + 16 * threadIdx.x + 4 * i, v);
      __syncthreads();
      wgmma_fence();
      wgmma_ss_n128_tt<false>(d, sw128_desc(0, 2048, 1024), sw128_desc(4096, 2048, 1024), false);
      wgmma_commit();
      wgmma_wait<0>();
    }
  });
  std::printf("not refused: %s\n", what.c_str());
  return 0;
}

// ---- the kernel -------------------------------------------------------------------------------
template <class T>
struct Buf {
  static constexpr size_t G = 64;
  std::vector<T> v;
  size_t n, shift;
  Buf(size_t n_, size_t shift_ = 0) : v(n_ + 2 * G + shift_), n(n_), shift(shift_) {
    std::fill(v.begin(), v.end(), Elem<T>::from_f(NAN));
  }
  T* data() { return v.data() + G + shift; }
  bool guards_intact() const {
    for (size_t i = 0; i < v.size(); ++i) {
      if (i >= G + shift && i < G + shift + n) continue;
      if (!std::isnan(Elem<T>::to_f(v[i]))) return false;
    }
    return true;
  }
};

// A case's line: its kernel, dtype, shape and which producer path it took.
std::string case_name(const char* what, const char* dtype, int C, int B, int H, int T_len, bool tma,
                      bool vec, size_t shift) {
  return std::string(what) + dtype + " C=" + std::to_string(C) + " B=" + std::to_string(B) +
         " H=" + std::to_string(H) + " T=" + std::to_string(T_len) +
         (tma   ? " tma"
          : vec ? " cp.async"
                : " guarded") +
         (shift ? " unaligned" : "");
}

// want_tma: the TMA producer where the launcher would take it (tma_usable), else cp.async /
// guarded loads as the launcher picks them.
template <class T, int C, bool kPipe = false>
void run_case(int B, int H, int T_len, size_t shift, double tol, const char* dtype, bool want_tma) {
  using namespace iddpm::cuda::attn_sm90;
  using Cfg = Sm90FwdCfg<T, C, kPipe>;
  const int BH = B * H;
  const size_t CT = static_cast<size_t>(C) * T_len, nqkv = BH * 3 * CT, nout = BH * CT;
  std::mt19937 rng(99 + T_len + C);
  std::normal_distribution<float> normal;
  Buf<T> qkv(nqkv, shift), out(nout);
  Buf<float> lse(static_cast<size_t>(BH) * T_len);
  for (size_t i = 0; i < nqkv; ++i) qkv.data()[i] = Elem<T>::from_f(normal(rng));
  attn_emu::g_global = {{qkv.data(), nqkv * sizeof(T)}};
  const bool vec = T_len % 8 == 0 && reinterpret_cast<uintptr_t>(qkv.data()) % 16 == 0;
  const int64_t rows = static_cast<int64_t>(BH) * 3 * C;
  const bool tma = want_tma && tma_usable(qkv.data(), rows, T_len);
  TmaMap map{};
  if (tma) {
    const TmaParams tp = tma_params<C>(rows, T_len);
    map = attn_emu::encode_tensor_map_2d(qkv.data(), tp.dim, tp.stride1, tp.box, true);
  }
  const float scale_log2 = iddpm::attn::logit_scale_log2<float>(C);
  gridDim = dim3(BH * ((T_len + Cfg::BQ - 1) / Cfg::BQ), 1, 1);  // the launcher's grid
  for (unsigned x = 0; x < gridDim.x; ++x) {
    blockIdx = make_uint3(x, 0, 0);
    attn_emu::run_block(Cfg::kThreads, smem_raw, Cfg::kSmemBytes, [&] {
      attn_fwd_sm90_kernel<T, C, kPipe>(map, qkv.data(), out.data(), lse.data(), T_len, scale_log2,
                                        vec, tma);
    });
  }
  // float64 on the same rounded inputs
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  double m_o = 0, e_o = 0, m_l = 0, e_l = 0;
  bool finite = true;
  std::vector<double> p(T_len);
  for (int bh = 0; bh < BH; ++bh) {
    // q, k as [position][channel], v as [channel][position], in double (converted once)
    const T* base = qkv.data() + bh * 3 * CT;
    std::vector<double> q(CT), k(CT), v(CT);
    for (int c = 0; c < C; ++c) {
      for (int t = 0; t < T_len; ++t) {
        q[t * C + c] = Elem<T>::to_f(base[c * T_len + t]);
        k[t * C + c] = Elem<T>::to_f(base[CT + c * T_len + t]);
        v[c * T_len + t] = Elem<T>::to_f(base[2 * CT + c * T_len + t]);
      }
    }
    for (int i = 0; i < T_len; ++i) {
      double mx = -INFINITY;
      for (int j = 0; j < T_len; ++j) {
        double s = 0;
        for (int c = 0; c < C; ++c) s += q[i * C + c] * k[j * C + c];
        p[j] = s * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int j = 0; j < T_len; ++j) sum += std::exp(p[j] - mx);
      const double l = mx + std::log(sum);
      for (int j = 0; j < T_len; ++j) p[j] = std::exp(p[j] - l);  // the softmax row
      const double got_l = lse.data()[bh * T_len + i];
      finite = finite && std::isfinite(got_l);
      m_l = std::max(m_l, std::fabs(l));
      e_l = std::max(e_l, std::fabs(l - got_l));
      for (int c = 0; c < C; ++c) {
        double acc = 0;
        for (int j = 0; j < T_len; ++j) acc += p[j] * v[c * T_len + j];
        const double got = Elem<T>::to_f(out.data()[bh * CT + c * T_len + i]);
        finite = finite && std::isfinite(got);
        m_o = std::max(m_o, std::fabs(acc));
        e_o = std::max(e_o, std::fabs(acc - got));
      }
    }
  }
  const std::string name =
      case_name(kPipe ? "sm90 pipelined " : "sm90 ", dtype, C, B, H, T_len, tma, vec, shift);
  const double r_o = e_o / (1e-30 + m_o), r_l = e_l / (1e-30 + m_l);
  std::printf("%-46s out %.2e lse %.2e\n", name.c_str(), r_o, r_l);
  expect(finite, name + ": unwritten output");
  expect(qkv.guards_intact() && out.guards_intact() && lse.guards_intact(),
         name + ": write outside a buffer");
  expect(r_o <= tol && r_l <= tol, name + ": forward error");
}

// Runs `kernel` for every block of `grid` (x outer), as the GPU would in some order.
template <class Kernel>
void launch(dim3 grid, int threads, size_t smem_bytes, const Kernel& kernel) {
  gridDim = grid;
  for (unsigned x = 0; x < grid.x; ++x) {
    for (unsigned y = 0; y < grid.y; ++y) {
      blockIdx = make_uint3(x, y, 0);
      attn_emu::run_block(threads, smem_raw, smem_bytes, kernel);
    }
  }
}

// The backward as attention_bwd_sm90.cu launches it: the sm_90a forward for out and lse, the
// delta kernel, the sm_90a backward kernel (TMA or cp.async / guarded producer; dq by atomics or,
// with want_bulk where the launcher would take it, by TMA reductions), the dq kernel; every
// gradient against float64 on the same rounded inputs.
template <class T, int C>
void run_bwd_case(int B, int H, int T_len, size_t shift, double tol_fwd, double tol_bwd,
                  const char* dtype, bool want_tma, bool want_bulk = false) {
  using namespace iddpm::cuda::attn_sm90;
  using iddpm::cuda::attn_kernels::attn_delta_kernel;
  using iddpm::cuda::attn_kernels::attn_dq_kernel;
  using F = Sm90FwdCfg<T, C>;
  using Bw = Sm90BwdCfg<T, C, false>;
  using BwBulk = Sm90BwdCfg<T, C, true>;
  const int BH = B * H;
  const size_t CT = static_cast<size_t>(C) * T_len, nqkv = BH * 3 * CT, nout = BH * CT;
  std::mt19937 rng(7 + T_len + C);
  std::normal_distribution<float> normal;
  Buf<T> qkv(nqkv, shift), dout(nout, shift), out(nout), grad(nqkv);
  Buf<float> lse(static_cast<size_t>(BH) * T_len), delta(static_cast<size_t>(BH) * T_len);
  Buf<float> dq_accum(nout);
  std::fill(dq_accum.data(), dq_accum.data() + nout, 0.0f);  // the launcher's memset
  for (size_t i = 0; i < nqkv; ++i) qkv.data()[i] = Elem<T>::from_f(normal(rng));
  for (size_t i = 0; i < nout; ++i) dout.data()[i] = Elem<T>::from_f(normal(rng));
  attn_emu::g_global = {{qkv.data(), nqkv * sizeof(T)},
                        {dout.data(), nout * sizeof(T)},
                        {dq_accum.data(), nout * sizeof(float)}};
  const bool vec = T_len % 8 == 0 && reinterpret_cast<uintptr_t>(qkv.data()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout.data()) % 16 == 0;
  const int64_t rows = static_cast<int64_t>(BH) * 3 * C;
  const bool tma = want_tma && tma_usable(qkv.data(), rows, T_len) &&
                   tma_usable(dout.data(), static_cast<int64_t>(BH) * C, T_len);
  TmaMap map_qkv{}, map_do{};
  if (tma) {
    const TmaParams tq = tma_params<C>(rows, T_len), td = tma_params<C>(BH * C, T_len);
    map_qkv = attn_emu::encode_tensor_map_2d(qkv.data(), tq.dim, tq.stride1, tq.box, true);
    map_do = attn_emu::encode_tensor_map_2d(dout.data(), td.dim, td.stride1, td.box, true);
  }
  const int64_t dq_rows = static_cast<int64_t>(BH) * C;
  const bool bulk = want_bulk && tma_usable(dq_accum.data(), dq_rows, T_len, 4);
  TmaMap map_dq{};
  if (bulk) {
    const TmaParams tp = tma_params_dq(dq_rows, T_len);
    map_dq = attn_emu::encode_tensor_map_2d(dq_accum.data(), tp.dim, tp.stride1, tp.box, true, 4);
  }
  const float scale = iddpm::attn::softmax_scale<float>(C);
  const float scale_log2 = iddpm::attn::logit_scale_log2<float>(C);
  launch(dim3(BH * ((T_len + F::BQ - 1) / F::BQ), 1), F::kThreads, F::kSmemBytes, [&] {
    attn_fwd_sm90_kernel<T, C>(map_qkv, qkv.data(), out.data(), lse.data(), T_len, scale_log2, vec,
                               tma);
  });
  const int d_tiles = (T_len + 127) / 128;
  launch(dim3(BH * d_tiles, 1), 128, 0,
         [&] { attn_delta_kernel<T>(dout.data(), out.data(), delta.data(), C, T_len, d_tiles); });
  const size_t bwd_smem = bulk ? BwBulk::kSmemBytes : Bw::kSmemBytes;
  launch(dim3(BH * ((T_len + Bw::BK - 1) / Bw::BK), 1), Bw::kThreads, bwd_smem, [&] {
    if (bulk) {
      attn_bwd_sm90_kernel<T, C, true>(map_qkv, map_do, map_dq, qkv.data(), dout.data(), lse.data(),
                                       delta.data(), grad.data(), dq_accum.data(), T_len, scale,
                                       scale_log2, vec, tma);
    } else {
      attn_bwd_sm90_kernel<T, C, false>(map_qkv, map_do, map_dq, qkv.data(), dout.data(),
                                        lse.data(), delta.data(), grad.data(), dq_accum.data(),
                                        T_len, scale, scale_log2, vec, tma);
    }
  });
  launch(dim3(3, 1), 256, 0,
         [&] { attn_dq_kernel<T>(dq_accum.data(), grad.data(), BH, C, T_len, scale); });

  std::vector<double> r_o(nout), r_lse(static_cast<size_t>(BH) * T_len), r_g(nqkv), g_o(nout),
      g_lse(r_lse.size()), g_g(nqkv);
  reference_heads(
      BH, C, T_len, qkv.data(), dout.data(), [](T x) { return Elem<T>::to_f(x); }, r_o, r_lse, r_g);
  bool finite = true;
  for (size_t i = 0; i < nout; ++i) g_o[i] = Elem<T>::to_f(out.data()[i]);
  for (size_t i = 0; i < r_lse.size(); ++i) g_lse[i] = lse.data()[i];
  for (size_t i = 0; i < nqkv; ++i) {
    g_g[i] = Elem<T>::to_f(grad.data()[i]);
    finite = finite && std::isfinite(g_g[i]);
  }
  const std::string name =
      case_name(bulk ? "sm90 bwd bulk-dq " : "sm90 bwd ", dtype, C, B, H, T_len, tma, vec, shift);
  double e_g[3];  // dq, dk, dv separately
  grad_part_errors(r_g, g_g, BH, CT, e_g);
  const double e_o = max_rel_err(r_o, g_o), e_l = max_rel_err(r_lse, g_lse);
  std::printf("%-46s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", name.c_str(), e_o, e_l, e_g[0],
              e_g[1], e_g[2]);
  expect(finite, name + ": unwritten gradient");
  expect(qkv.guards_intact() && dout.guards_intact() && grad.guards_intact() &&
             lse.guards_intact() && delta.guards_intact() && dq_accum.guards_intact(),
         name + ": write outside a buffer");
  expect(e_o <= tol_fwd && e_l <= tol_fwd, name + ": forward error");
  expect(e_g[0] <= tol_bwd && e_g[1] <= tol_bwd && e_g[2] <= tol_bwd, name + ": backward error");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--refuse") return refuse(argv[2]);
  check_swizzle();
  check_canonical_layouts();
  check_descriptor();
  check_mbarrier();
  check_wgmma();
  check_named_barriers();
  check_tma_reduce();
  // The sm_80 kernel's tolerances (attention_emulation.cpp): fp16 4e-3, bf16 3e-2.
  run_case<__half, 64>(1, 2, 37, 0, 4e-3, "fp16", true);  // one partial tile: guarded loads
  run_case<__nv_bfloat16, 128>(2, 1, 37, 0, 3e-2, "bf16", true);
  // 2 tiles, the second partial (zeros past T): TMA and cp.async
  run_case<__half, 128>(1, 1, 200, 0, 4e-3, "fp16", true);
  run_case<__half, 128>(1, 1, 200, 0, 4e-3, "fp16", false);
  run_case<__nv_bfloat16, 64>(1, 1, 200, 0, 3e-2, "bf16", true);
  run_case<__nv_bfloat16, 64>(2, 2, 128, 0, 3e-2, "bf16", true);  // whole tile
  run_case<__half, 128>(1, 1, 128, 3, 4e-3, "fp16", true);        // unaligned storage: guarded
  run_case<__half, 64>(1, 1, 1024, 0, 4e-3, "fp16", true);        // 8 tiles: 4 rounds of each stage
  run_case<__nv_bfloat16, 64>(1, 1, 384, 0, 3e-2, "bf16", false);  // 3 tiles, cp.async
  run_case<__half, 64>(1, 2, 300, 0, 4e-3, "fp16", false);  // 2 heads × 3 query tiles (the grid)
  // The pipelined consumers (S of tile kt with P·vᵀ of tile kt - 1, the two warpgroups taking
  // turns; 6 / 3 stages): one tile (T = 37, 128), two (200), fewer tiles than stages (T = 640
  // at C = 64: 5 of 6), more (512 at C = 128: 4 over 3; 1024 at C = 64: 8 over 6), both
  // producers, unaligned storage.
  run_case<__half, 64, true>(1, 2, 37, 0, 4e-3, "fp16", true);
  run_case<__nv_bfloat16, 128, true>(2, 1, 37, 0, 3e-2, "bf16", true);
  run_case<__half, 128, true>(1, 1, 200, 0, 4e-3, "fp16", true);
  run_case<__nv_bfloat16, 64, true>(2, 2, 128, 0, 3e-2, "bf16", true);
  run_case<__half, 64, true>(1, 1, 640, 0, 4e-3, "fp16", true);
  run_case<__nv_bfloat16, 128, true>(1, 1, 512, 0, 3e-2, "bf16", false);
  run_case<__half, 128, true>(1, 2, 300, 3, 4e-3, "fp16", true);  // unaligned: guarded
  run_case<__nv_bfloat16, 64, true>(1, 1, 1024, 0, 3e-2, "bf16", false);
  run_case<__half, 64, true>(1, 1, 2048, 0, 4e-3, "fp16", true);  // 16 tiles: 3 rounds of 6 stages
  run_case<__half, 128, true>(1, 1, 1536, 0, 4e-3, "fp16", false);  // 12 tiles: 4 rounds of 3
  // The backward (after the sm_90a forward), the sm_80 kernels' tolerances (fp16 4e-3 / 1e-2,
  // bf16 3e-2 / 6e-2): one partial key tile with guarded loads (T = 37; the second consumer's
  // keys all past T), two key tiles with a partial second and several query tiles over both
  // stages (T = 200: TMA and cp.async), whole tiles (T = 256, B = H = 2), unaligned storage.
  run_bwd_case<__half, 64>(1, 2, 37, 0, 4e-3, 1e-2, "fp16", true);
  run_bwd_case<__nv_bfloat16, 128>(1, 1, 37, 0, 3e-2, 6e-2, "bf16", true);
  run_bwd_case<__half, 128>(1, 1, 200, 0, 4e-3, 1e-2, "fp16", true);
  run_bwd_case<__half, 128>(1, 1, 200, 0, 4e-3, 1e-2, "fp16", false);
  run_bwd_case<__nv_bfloat16, 64>(2, 2, 256, 0, 3e-2, 6e-2, "bf16", true);
  run_bwd_case<__half, 64>(1, 1, 320, 0, 4e-3, 1e-2, "fp16", false);  // 5 query tiles, cp.async
  run_bwd_case<__half, 64>(1, 1, 128, 3, 4e-3, 1e-2, "fp16", true);   // unaligned: guarded
  // dq by TMA reductions (bulk dq): a partial second query tile and key tile (T = 200: the
  // boxes' positions past T skipped), whole tiles over B = H = 2 (the rows of other heads), five
  // query tiles (buffers reused twice) with cp.async, C = 128 (two chunks per tile), unaligned
  // qkv; T = 37 (T % 4 != 0) takes the atomics.
  run_bwd_case<__half, 64>(1, 1, 200, 0, 4e-3, 1e-2, "fp16", true, true);
  run_bwd_case<__nv_bfloat16, 64>(2, 2, 256, 0, 3e-2, 6e-2, "bf16", true, true);
  run_bwd_case<__half, 64>(1, 1, 320, 0, 4e-3, 1e-2, "fp16", false, true);
  run_bwd_case<__half, 128>(1, 1, 200, 0, 4e-3, 1e-2, "fp16", true, true);
  run_bwd_case<__nv_bfloat16, 128>(1, 2, 384, 0, 3e-2, 6e-2, "bf16", false, true);
  run_bwd_case<__half, 128>(1, 1, 132, 3, 4e-3, 1e-2, "fp16", true, true);  // unaligned qkv
  run_bwd_case<__half, 64>(1, 2, 37, 0, 4e-3, 1e-2, "fp16", true, true);    // atomics
  std::printf(g_failures ? "%d FAILURES\n" : "all passed\n", g_failures);
  return g_failures ? 1 : 0;
}

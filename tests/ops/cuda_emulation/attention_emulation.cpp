// tests/ops/cuda_emulation/attention_emulation.cpp — runs the CUDA attention kernels
// (csrc/cuda/attention_{fwd,bwd}_kernel.cuh, unchanged) on the CPU through warp_emulator.h and
// checks them against a float64 reference computed here, for fp16, bf16 and fp32 inputs, every
// tile width Cp (32, 64, 128, 256) at C = Cp and head dims C < Cp on the tile above (48, 80,
// 96, 160, 192, with channels C..Cp-1 zero-filled and never stored): both global-load paths
// (cp.async and guarded), partial and pipelined tiles, every output element written (buffers start
// as NaN), nothing written outside them (guard zones). fp32 runs under each product precision:
// "fp32" is kFma (fp32 FMAs, the reference the TF32 paths are also compared with), "tf32" kTf32
// and "tf32x3" kTf32x3 (split-TF32), the two the GPU launchers compile. Built and run by
// tests/ops/test_attention_cuda_emulation.py. Exit code 0 = pass.
//
// `attention_emulation --tf32-round IN OUT` instead rounds the little-endian fp32 bit patterns
// of file IN with the kernels' fp32 → TF32 conversion (tf32_bits, here the emulated
// cvt.rna.tf32.f32) and writes the results to OUT (the test compares them with numpy).
//
// What it cannot check: that the hardware's mma.sync / ldmatrix follow the layouts the emulator
// implements (the PTX ISA's, also written down in attention_common.cuh), timing, and memory
// hazards between CTAs — those are the GPU tests' job.
#include "warp_emulator.h"  // first: defines the emulation hooks and CUDA built-ins

#include <algorithm>
#include <random>
#include <string>

#include "attention_reference.h"
#include "cuda/attention_bwd_kernel.cuh"
#include "cuda/attention_fwd_kernel.cuh"

namespace iddpm::cuda::attn_kernels {
alignas(16) unsigned char smem_raw[256 * 1024];
}

using namespace iddpm::cuda::attn_kernels;
using iddpm::cuda::attn_dev::Elem;
using iddpm::cuda::attn_dev::Prec;

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++g_failures;
  }
}

template <class T>
float to_f(T x) {
  return Elem<T>::to_f(x);
}
template <class T>
T from_f(float x) {
  return Elem<T>::from_f(x);
}

// A buffer with guard zones of NaN on both sides; the data starts 16-byte aligned (+ `shift`
// elements, to make it unaligned on purpose).
template <class T>
struct Buf {
  static constexpr size_t G = 64;
  std::vector<T> v;
  size_t n, shift;
  Buf(size_t n_, size_t shift_ = 0) : v(n_ + 2 * G + shift_), n(n_), shift(shift_) {
    std::fill(v.begin(), v.end(), from_f<T>(NAN));
  }
  T* data() { return v.data() + G + shift; }
  bool guards_intact() const {
    for (size_t i = 0; i < v.size(); ++i) {
      if (i >= G + shift && i < G + shift + n) continue;
      if (!std::isnan(to_f(v[i]))) return false;
    }
    return true;
  }
  bool all_finite() {
    for (size_t i = 0; i < n; ++i) {
      if (!std::isfinite(to_f(data()[i]))) return false;
    }
    return true;
  }
};

// Runs `kernel` (a call of a __global__ function) for every block of `grid` in turn, x outer
// and z inner, as the GPU would run them in some order.
template <class Kernel>
void launch(dim3 grid, int threads, size_t smem_bytes, const Kernel& kernel) {
  gridDim = grid;
  for (unsigned x = 0; x < grid.x; ++x) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned z = 0; z < grid.z; ++z) {
        blockIdx = make_uint3(x, y, z);
        attn_emu::run_block(threads, smem_raw, smem_bytes, kernel);
      }
    }
  }
}

// What a case computed: out then grad_qkv (as doubles), and its largest relative errors.
struct Result {
  std::vector<double> values;
  double err_fwd = 0, err_bwd = 0;
};

// The launch order of the next cases: false, the launchers' default grid [B·H, tiles]; true,
// their tile-major grid [tiles, B·H] (IDDPM_ATTENTION_TILE_MAJOR; fp16 / bf16 only).
bool g_tile_major = false;

// dim3 of the launchers' grid for `tiles` tiles per (b·h) and `z` channel slices.
dim3 launcher_grid(int BH, int tiles, int z) {
  return g_tile_major ? dim3(tiles, BH, z) : dim3(BH, tiles, z);
}

// Head dim C on the kernels of tile width Cp >= C, products under P.
template <class T, int Cp, Prec P = Elem<T>::kTensorCore ? Prec::kNative : Prec::kFma>
Result run_case(int C, int B, int H, int T_len, size_t shift, double tol_fwd, double tol_bwd,
                const char* dtype) {
  const int BH = B * H;
  const size_t nqkv = static_cast<size_t>(BH) * 3 * C * T_len, nout = nqkv / 3;
  std::mt19937 rng(1234 + T_len + C);
  std::normal_distribution<float> normal;
  Buf<T> qkv(nqkv, shift), dout(nout), out(nout), grad(nqkv);
  Buf<float> lse(static_cast<size_t>(BH) * T_len), delta(static_cast<size_t>(BH) * T_len);
  std::vector<float> dq_accum(nout, 0.0f);
  for (size_t i = 0; i < nqkv; ++i) qkv.data()[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < nout; ++i) dout.data()[i] = from_f<T>(normal(rng));
  attn_emu::g_global = {{qkv.data(), nqkv * sizeof(T)}, {dout.data(), nout * sizeof(T)}};
  constexpr int E = 16 / sizeof(T);
  const bool vec = T_len % E == 0 && reinterpret_cast<uintptr_t>(qkv.data()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout.data()) % 16 == 0;
  const float scale = iddpm::attn::softmax_scale<float>(C);
  const float scale_log2 = iddpm::attn::logit_scale_log2<float>(C);

  // forward (the launchers' grids and kernel instances: tile-major ones for fp16 / bf16 only)
  using F = FwdCfg<T, Cp>;
  using Bw = BwdCfg<T, Cp>;
  auto fwd = attn_fwd_kernel<T, Cp, P, false>;
  auto bwd = attn_bwd_kernel<T, Cp, P, false>;
  if constexpr (sizeof(T) == 2) {
    if (g_tile_major) {
      fwd = attn_fwd_kernel<T, Cp, P, true>;
      bwd = attn_bwd_kernel<T, Cp, P, true>;
    }
  }
  launch(launcher_grid(BH, (T_len + F::BQ - 1) / F::BQ, 1), F::kThreads, F::kSmemBytes,
         [&] { fwd(qkv.data(), out.data(), lse.data(), C, T_len, scale_log2, vec); });
  // backward: delta, main (one CTA per channel slice along z), dq
  const int d_tiles = (T_len + 127) / 128;
  launch(dim3(BH * d_tiles, 1, 1), 128, 0,
         [&] { attn_delta_kernel<T>(dout.data(), out.data(), delta.data(), C, T_len, d_tiles); });
  launch(launcher_grid(BH, (T_len + Bw::BK - 1) / Bw::BK, (C + Bw::CA - 1) / Bw::CA), Bw::kThreads,
         Bw::kSmemBytes, [&] {
           bwd(qkv.data(), dout.data(), lse.data(), delta.data(), grad.data(), dq_accum.data(), C,
               T_len, scale, scale_log2, vec);
         });
  // grid-stride kernel: a few blocks cover everything
  launch(dim3(3, 1, 1), 256, 0,
         [&] { attn_dq_kernel<T>(dq_accum.data(), grad.data(), BH, C, T_len, scale); });

  // compare with float64 on the same (rounded) inputs
  const size_t CT = static_cast<size_t>(C) * T_len;
  std::vector<double> r_o(nout), r_lse(static_cast<size_t>(BH) * T_len), r_g(nqkv), g_o(nout),
      g_lse(r_lse.size()), g_g(nqkv);
  reference_heads(
      BH, C, T_len, qkv.data(), dout.data(), [](T x) { return to_f(x); }, r_o, r_lse, r_g);
  for (size_t i = 0; i < nout; ++i) g_o[i] = to_f(out.data()[i]);
  for (size_t i = 0; i < r_lse.size(); ++i) g_lse[i] = lse.data()[i];
  for (size_t i = 0; i < nqkv; ++i) g_g[i] = to_f(grad.data()[i]);

  const std::string name = std::string(dtype) + " C=" + std::to_string(C) +
                           (C < Cp ? " (Cp=" + std::to_string(Cp) + ")" : std::string()) +
                           " B=" + std::to_string(B) + " H=" + std::to_string(H) +
                           " T=" + std::to_string(T_len) + (vec ? " cp.async" : " guarded") +
                           (shift ? " unaligned" : "") + (g_tile_major ? " tile-major" : "");
  expect(out.all_finite() && lse.all_finite() && grad.all_finite(), name + ": unwritten output");
  expect(qkv.guards_intact() && out.guards_intact() && grad.guards_intact() &&
             lse.guards_intact() && delta.guards_intact(),
         name + ": write outside a buffer");
  const double e_o = max_rel_err(r_o, g_o), e_lse = max_rel_err(r_lse, g_lse);
  double e_g[3];  // dq, dk, dv separately
  grad_part_errors(r_g, g_g, BH, CT, e_g);
  std::printf("%-44s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", name.c_str(), e_o, e_lse, e_g[0],
              e_g[1], e_g[2]);
  expect(e_o <= tol_fwd && e_lse <= tol_fwd, name + ": forward error");
  expect(e_g[0] <= tol_bwd && e_g[1] <= tol_bwd && e_g[2] <= tol_bwd, name + ": backward error");
  Result r;
  r.values = g_o;
  r.values.insert(r.values.end(), g_g.begin(), g_g.end());
  r.err_fwd = std::max(e_o, e_lse);
  r.err_bwd = std::max({e_g[0], e_g[1], e_g[2]});
  return r;
}

// fp32 attention at head dim C (tile Cp) under TF32 (within fp16-like tolerances of float64)
// and split-TF32 (within fp32 ones), split-TF32 clearly more accurate than TF32 (so that a
// swapped or ineffective split shows), and with kWithFma split-TF32 also close to the fp32-FMA
// kernel (kFma, the fp32 path before TF32; compiled at Cp = 64 only, to keep the build short).
template <int Cp, bool kWithFma = false>
void run_fp32_precisions(int C, int T_len) {
  const Result x1 = run_case<float, Cp, Prec::kTf32>(C, 1, 2, T_len, 0, 4e-3, 1e-2, "tf32");
  const Result x3 = run_case<float, Cp, Prec::kTf32x3>(C, 1, 2, T_len, 0, 2e-5, 1e-4, "tf32x3");
  const std::string name = "C=" + std::to_string(C) + " T=" + std::to_string(T_len);
  expect(x3.err_fwd * 16 < x1.err_fwd && x3.err_bwd * 16 < x1.err_bwd,
         "tf32x3 not clearly more accurate than tf32 " + name);
  if constexpr (kWithFma) {
    const Result fma = run_case<float, Cp, Prec::kFma>(C, 1, 2, T_len, 0, 2e-5, 1e-4, "fp32");
    double diff = 0, m = 0;
    for (size_t i = 0; i < fma.values.size(); ++i) {
      diff = std::max(diff, std::fabs(fma.values[i] - x3.values[i]));
      m = std::max(m, std::fabs(fma.values[i]));
    }
    std::printf("tf32x3 vs fp32 (kFma) %-12s max rel diff %.2e\n", name.c_str(), diff / m);
    expect(diff / m <= 2e-5, "tf32x3 vs fp32 kernel " + name);
  }
}

// The tile-major launch order (grid [tiles, B·H]) against the default one on the same inputs:
// the forward and dk, dv bit for bit (each CTA computes its own tile either way), dq within
// rounding (its atomic sums run in another order), both against float64 as usual.
template <class T, int Cp>
void run_tile_major(int C, int B, int H, int T_len, double tol_fwd, double tol_bwd,
                    const char* dtype) {
  g_tile_major = false;
  const Result a = run_case<T, Cp>(C, B, H, T_len, 0, tol_fwd, tol_bwd, dtype);
  g_tile_major = true;
  const Result b = run_case<T, Cp>(C, B, H, T_len, 0, tol_fwd, tol_bwd, dtype);
  g_tile_major = false;
  const size_t CT = static_cast<size_t>(C) * T_len, nout = static_cast<size_t>(B) * H * CT;
  bool same = a.values.size() == b.values.size();
  double dq_diff = 0, dq_max = 0;
  for (size_t i = 0; same && i < a.values.size(); ++i) {
    const bool is_dq = i >= nout && (i - nout) % (3 * CT) < CT;
    if (is_dq) {
      dq_diff = std::max(dq_diff, std::fabs(a.values[i] - b.values[i]));
      dq_max = std::max(dq_max, std::fabs(a.values[i]));
    } else {
      same = a.values[i] == b.values[i];
    }
  }
  std::printf("tile-major vs default %s C=%d B=%d H=%d T=%d: out, dk, dv %s, dq %.2e\n", dtype, C,
              B, H, T_len, same ? "identical" : "DIFFER", dq_diff / (1e-30 + dq_max));
  expect(same && dq_diff <= tol_bwd * dq_max, "tile-major launch order changes the results");
}

// The TF32 product (two m16n8k8 per 16×8×16 fragment product) on values exact in TF32 against
// a float64 product, and split-TF32 on arbitrary fp32 values.
void tf32_self_tests() {
  using namespace iddpm::cuda::attn_dev;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-8, 8);
  std::normal_distribution<float> normal;
  float Ai[16][16], Bi[16][8], Af[16][16], Bf[16][8];
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) Ai[m][k] = small(rng) / 4.0f, Af[m][k] = normal(rng);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) Bi[k][n] = small(rng) / 4.0f, Bf[k][n] = normal(rng);
  double err_exact = 0, err_split = 0, scale = 0;
  attn_emu::run_block(32, smem_raw, sizeof(smem_raw), [&] {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    FragA<float> a, af;
    FragB<float> b, bf;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
      a.x[i] = make_float2(Ai[m][k], Ai[m][k + 1]);
      af.x[i] = make_float2(Af[m][k], Af[m][k + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      b.x[i] = make_float2(Bi[2 * t + 8 * i][g], Bi[2 * t + 8 * i + 1][g]);
      bf.x[i] = make_float2(Bf[2 * t + 8 * i][g], Bf[2 * t + 8 * i + 1][g]);
    }
    float c[4] = {0, 0, 0, 0}, cs[4] = {0, 0, 0, 0};
    mma<Prec::kTf32>(c, a, b);
    mma<Prec::kTf32x3>(cs, af, bf);
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double ref = 0, ref_f = 0, mag = 0;
      for (int k = 0; k < 16; ++k) {
        ref += static_cast<double>(Ai[m][k]) * Bi[k][n];
        ref_f += static_cast<double>(Af[m][k]) * Bf[k][n];
        mag += std::fabs(static_cast<double>(Af[m][k]) * Bf[k][n]);
      }
      err_exact = std::max(err_exact, std::fabs(ref - c[i]));
      err_split = std::max(err_split, std::fabs(ref_f - cs[i]));
      scale = std::max(scale, mag);
    }
  });
  std::printf("self-test: tf32 mma error %.2e (exact operands), tf32x3 error %.2e of sum|ab|\n",
              err_exact, err_split / scale);
  expect(err_exact == 0.0, "tf32 mma (exact on these small integers)");
  expect(err_split / scale <= 2e-6, "tf32x3 mma accuracy");
}

// --tf32-round IN OUT (see the top).
int round_file(const char* in, const char* out) {
  FILE* f = std::fopen(in, "rb");
  if (!f) return 2;
  std::vector<uint32_t> v;
  uint32_t u;
  while (std::fread(&u, 4, 1, f) == 1) v.push_back(u);
  std::fclose(f);
  for (uint32_t& x : v) {
    float y;
    std::memcpy(&y, &x, 4);
    x = iddpm::cuda::attn_dev::tf32_bits(y);
  }
  f = std::fopen(out, "wb");
  if (!f) return 2;
  const bool ok = std::fwrite(v.data(), 4, v.size(), f) == v.size();
  std::fclose(f);
  std::printf("rounded %zu values\n", v.size());
  return ok ? 0 : 2;
}

// The fp32 product by lane shuffles (used on the GPU) against a float64 product, and the fp32
// fragment loaders against the ldmatrix (b16) ones on the same matrix.
void self_tests() {
  using namespace iddpm::cuda::attn_dev;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-8, 8);
  float A[16][16], Bm[16][8];
  for (auto& r : A)
    for (float& x : r) x = small(rng) / 4.0f;
  for (auto& r : Bm)
    for (float& x : r) x = small(rng) / 4.0f;
  float err = 0;
  alignas(16) static float fs[16 * 24];
  alignas(16) static __half hs[16 * 24];
  bool same = true;
  attn_emu::run_block(32, smem_raw, sizeof(smem_raw), [&] {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    FragA<float> a;
    FragB<float> b;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
      a.x[i] = make_float2(A[m][k], A[m][k + 1]);
    }
    for (int i = 0; i < 2; ++i)
      b.x[i] = make_float2(Bm[2 * t + 8 * i][g], Bm[2 * t + 8 * i + 1][g]);
    float c[4] = {0, 0, 0, 0};
    mma_f32_shuffle(c, a, b);
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += static_cast<double>(A[m][k]) * Bm[k][n];
      err = std::max(err, static_cast<float>(std::fabs(ref - c[i])));
    }
    // loaders: a 16×24 matrix in smem (rows r, cols x), as float and as half (values exact)
    if (lane == 0) {
      for (int r = 0; r < 16; ++r) {
        for (int x = 0; x < 24; ++x) {
          fs[r * 24 + x] = static_cast<float>(small(rng));
          hs[r * 24 + x] = __float2half_rn(fs[r * 24 + x]);
        }
      }
    }
    __syncthreads();
  });
  // The loaders read smem through the emulator's bounds check: run them on smem_raw copies.
  float* sf = reinterpret_cast<float*>(smem_raw);
  __half* sh = reinterpret_cast<__half*>(smem_raw + 16 * 24 * sizeof(float));
  attn_emu::run_block(32, smem_raw, sizeof(smem_raw), [&] {
    if (threadIdx.x == 0) {
      std::memcpy(sf, fs, sizeof(fs));
      std::memcpy(sh, hs, sizeof(hs));
    }
    __syncthreads();
    auto check_pair = [&](float2 f, uint32_t h) {
      __half2 x;
      std::memcpy(&x, &h, 4);
      if (__half2float(x.x) != f.x || __half2float(x.y) != f.y) same = false;
    };
    FragA<float> af;
    FragA<__half> ah;
    load_a_kmajor(af, sf, 24, 8, 0);
    load_a_kmajor(ah, sh, 24, 8, 0);
    for (int i = 0; i < 4; ++i) check_pair(af.x[i], ah.x[i]);
    FragB<float> bf0, bf1;
    FragB<__half> bh0, bh1;
    load_b<Major::k>(bf0, bf1, sf, 24, 0, 8);
    load_b<Major::k>(bh0, bh1, sh, 24, 0, 8);
    load_b<Major::n>(bf0, bf1, sf, 24, 8, 0);  // n-major read of the same storage
    load_b<Major::n>(bh0, bh1, sh, 24, 8, 0);
    for (int i = 0; i < 2; ++i) check_pair(bf0.x[i], bh0.x[i]), check_pair(bf1.x[i], bh1.x[i]);
    load_b<Major::k>(bf0, bf1, sf, 24, 0, 0);
    load_b<Major::k>(bh0, bh1, sh, 24, 0, 0);
    for (int i = 0; i < 2; ++i) check_pair(bf0.x[i], bh0.x[i]), check_pair(bf1.x[i], bh1.x[i]);
  });
  std::printf("self-test: fp32 shuffle mma error %.2e, fp32 vs ldmatrix fragments %s\n", err,
              same ? "equal" : "DIFFER");
  expect(err == 0.0f, "fp32 shuffle mma (exact on these small integers)");
  expect(same, "fp32 and ldmatrix fragment loads disagree");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--tf32-round") return round_file(argv[2], argv[3]);
  self_tests();
  tf32_self_tests();
  for (int T_len : {37, 80}) {
    run_case<__half, 32>(32, 1, 2, T_len, 0, 4e-3, 1e-2, "fp16");
    run_case<__half, 64>(64, 1, 2, T_len, 0, 4e-3, 1e-2, "fp16");
    run_case<__half, 128>(128, 1, 2, T_len, 0, 4e-3, 1e-2, "fp16");
    run_case<__nv_bfloat16, 32>(32, 1, 2, T_len, 0, 3e-2, 6e-2, "bf16");
    run_case<__nv_bfloat16, 64>(64, 1, 2, T_len, 0, 3e-2, 6e-2, "bf16");
    run_case<__nv_bfloat16, 128>(128, 1, 2, T_len, 0, 3e-2, 6e-2, "bf16");
  }
  run_case<__half, 64>(64, 2, 1, 136, 0, 4e-3, 1e-2, "fp16");  // 3 pipelined tiles, cp.async
  run_case<float, 32, Prec::kTf32>(32, 1, 1, 136, 0, 4e-3, 1e-2, "tf32");  // rounds each stage
  run_case<__nv_bfloat16, 64>(64, 1, 1, 130, 0, 3e-2, 6e-2, "bf16");       // 3 tiles, guarded
  run_case<__half, 128>(128, 1, 1, 130, 0, 4e-3, 1e-2, "fp16");  // backward: 5 query tiles of 32
  run_case<float, 64, Prec::kTf32x3>(64, 1, 1, 130, 0, 2e-5, 1e-4, "tf32x3");
  run_case<__half, 64>(64, 1, 2, 80, 1, 4e-3, 1e-2, "fp16");  // unaligned storage: guarded loads

  // Head dims below their tile width (zero-filled channels), and Cp = 256 (key tiles of 32, q
  // read from shared memory, two channel slices in the backward; query tiles of 16 in fp32).
  // T = 37: one partial tile, guarded loads; T = 80: several tiles, cp.async.
  run_case<__half, 64>(48, 1, 2, 37, 0, 4e-3, 1e-2, "fp16");
  run_case<__nv_bfloat16, 128>(80, 1, 1, 80, 0, 3e-2, 6e-2, "bf16");
  run_case<__half, 128>(96, 1, 2, 80, 0, 4e-3, 1e-2, "fp16");
  run_case<__nv_bfloat16, 32>(24, 1, 1, 37, 0, 3e-2, 6e-2, "bf16");
  run_case<__half, 32>(8, 1, 1, 37, 0, 4e-3, 1e-2, "fp16");
  for (int T_len : {37, 80}) {
    run_case<__half, 256>(256, 1, 1, T_len, 0, 4e-3, 1e-2, "fp16");
    run_case<__nv_bfloat16, 256>(192, 1, 1, T_len, 0, 3e-2, 6e-2, "bf16");
    run_case<float, 256, Prec::kTf32x3>(160, 1, 1, T_len, 0, 2e-5, 1e-4, "tf32x3");
  }
  run_case<__half, 256>(160, 1, 1, 37, 0, 4e-3, 1e-2, "fp16");
  run_case<float, 256, Prec::kTf32x3>(256, 1, 1, 37, 0, 2e-5, 1e-4, "tf32x3");
  run_case<__nv_bfloat16, 256>(256, 1, 1, 37, 0, 3e-2, 6e-2, "bf16");
  run_case<float, 64, Prec::kTf32>(48, 1, 1, 80, 0, 4e-3, 1e-2, "tf32");
  run_case<__half, 256>(192, 1, 1, 80, 1, 4e-3, 1e-2, "fp16");  // unaligned storage
  run_case<__nv_bfloat16, 128>(96, 1, 1, 80, 3, 3e-2, 6e-2, "bf16");
  // fp32 under TF32 and split-TF32 (against float64, and at Cp = 64 the fp32-FMA kernel): every
  // tile width, head dims below their tile width, partial (T = 37: keys and queries masked) and
  // whole tiles (T = 64), cp.async and guarded loads.
  // The tile-major launch order: several heads and tiles, and Cp = 256's two channel slices;
  // B·H differs from the tile count, so a kernel reading the wrong grid dimension is caught.
  run_tile_major<__half, 64>(64, 2, 3, 200, 4e-3, 1e-2, "fp16");
  run_tile_major<__nv_bfloat16, 256>(160, 1, 3, 80, 3e-2, 6e-2, "bf16");
  run_fp32_precisions<32>(32, 37);
  run_fp32_precisions<64, true>(64, 64);
  run_fp32_precisions<64, true>(48, 37);
  run_fp32_precisions<128>(128, 37);
  run_fp32_precisions<128>(96, 64);
  run_case<float, 32, Prec::kTf32>(32, 1, 1, 64, 0, 4e-3, 1e-2, "tf32");
  run_case<float, 32, Prec::kTf32x3>(24, 1, 1, 64, 1, 2e-5, 1e-4, "tf32x3");  // unaligned
  run_case<float, 64, Prec::kTf32>(48, 1, 1, 37, 0, 4e-3, 1e-2, "tf32");
  run_case<float, 256, Prec::kTf32>(160, 1, 1, 37, 0, 4e-3, 1e-2, "tf32");  // q read per product
  std::printf(g_failures ? "%d FAILURES\n" : "all passed\n", g_failures);
  return g_failures ? 1 : 0;
}

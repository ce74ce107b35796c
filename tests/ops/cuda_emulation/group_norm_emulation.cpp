// tests/ops/cuda_emulation/group_norm_emulation.cpp — runs the CUDA kernels of
// iddpm::group_norm_act (csrc/cuda/group_norm_kernel.cuh, unchanged) on the CPU through
// warp_emulator.h: every block of the grid in turn, 256 threads each, with the warp shuffles and
// barriers of the block sums emulated. Built and driven by
// tests/ops/test_group_norm_cuda_emulation.py, which writes a case and compares what comes back
// with a float64 oracle and with the CPU op.
//
//   group_norm_emulation CASE OUT
// CASE (little-endian): 12 int64 — dtype (0 float32, 1 float64, 2 float16, 3 bfloat16), N, C, S,
// G, channels_last, silu, has_weight, has_bias, has_scale, has_shift, the elementwise kernels'
// grid cap — then the float64 eps, then float64 arrays: x and grad_out (N·C·S each, in memory
// order: [N, C, S] or, channels-last, [N, S, C]), weight [C], bias [C], scale [N, C], shift [N, C]
// (those present). OUT: float64 arrays y, mean [N, G], rstd [N, G], grad_x, grad_weight [C],
// grad_bias [C], grad_scale [N, C], grad_shift [N, C]. Every output buffer and the backward's work
// buffer start as NaN, so an element no kernel writes (or a read of scratch before its write)
// shows. The elementwise kernels run with min(blocks needed, cap) blocks: a small cap exercises
// their grid-stride loops. `__shared__` is `static` here: one array per kernel instantiation,
// which the emulated threads of a block share, as a CTA shares its shared memory (blocks run one
// after another). Unlike the emulator's dynamic shared memory these arrays are not refilled with
// NaN per block: a slot a block reads without writing holds the last block's value (0 at first),
// so such a bug would show only as wrong sums, not as NaN.
//
// What it cannot check: timing, memory hazards between blocks that run at once on a GPU (none of
// these kernels shares memory across blocks: each writes its own slots), and the hardware's
// float rounding of exp (the host's exp stands in for CUDA's).
#define __shared__ static   // before the CUDA headers (host_defines.h keeps a definition it finds)
#include "warp_emulator.h"  // the emulation hooks and CUDA built-ins

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "cuda/group_norm_kernel.cuh"

using namespace iddpm;
using namespace iddpm::cuda::gn_kernels;

namespace {

unsigned char g_smem[64];  // the emulator's dynamic shared memory (these kernels use none)

// Runs `body` as every block of a grid of `blocks` blocks of kThreads threads.
template <class F>
void launch(int64_t blocks, F body) {
  gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx = make_uint3(static_cast<unsigned>(b), 0, 0);
    attn_emu::run_block(kThreads, g_smem, sizeof(g_smem), body);
  }
}

template <class V>
std::vector<V> nan_buffer(int64_t n) {
  return std::vector<V>(static_cast<size_t>(n > 0 ? n : 1), static_cast<V>(NAN));
}

struct Case {
  int64_t h[12];
  double eps;
  std::vector<double> x, dy, w, b, sc, sh;
};

bool read_all(FILE* f, void* dst, size_t bytes) { return std::fread(dst, 1, bytes, f) == bytes; }

template <class T>
T from_double(double v) {
  return iddpm::cuda::from_acc<T>(static_cast<iddpm::cuda::Acc<T>>(v));
}

template <class V>
void write_doubles(FILE* f, const std::vector<V>& v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(iddpm::cuda::to_acc(v[static_cast<size_t>(i)]));
    std::fwrite(&d, sizeof d, 1, f);
  }
}

template <class T>
int run(const Case& c, FILE* out) {
  using A = iddpm::cuda::Acc<T>;
  const int64_t N = c.h[1], C = c.h[2], S = c.h[3], G = c.h[4], cap = c.h[11];
  const int64_t total = N * C * S;
  GroupNormShape s;
  s.N = N, s.C = C, s.S = S, s.G = G, s.channels_last = c.h[5] != 0, s.silu = c.h[6] != 0;
  std::vector<T> x(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  for (int64_t i = 0; i < total; ++i) {
    x[static_cast<size_t>(i)] = from_double<T>(c.x[static_cast<size_t>(i)]);
    dy[static_cast<size_t>(i)] = from_double<T>(c.dy[static_cast<size_t>(i)]);
  }
  const auto acc_copy = [](const std::vector<double>& v) {
    return std::vector<A>(v.begin(), v.end());
  };
  const std::vector<A> w = acc_copy(c.w), b = acc_copy(c.b), sc = acc_copy(c.sc),
                       sh = acc_copy(c.sh);
  const auto ptr = [](const std::vector<A>& v) -> const void* {
    return v.empty() ? nullptr : v.data();
  };
  const int64_t elem_blocks = std::min((total + kThreads - 1) / kThreads, cap);

  std::vector<T> y = nan_buffer<T>(total), dx = nan_buffer<T>(total);
  std::vector<A> mean = nan_buffer<A>(N * G), rstd = nan_buffer<A>(N * G);
  GroupNormActFwdParams f;
  f.s = s, f.x = x.data(), f.y = y.data(), f.weight = ptr(w), f.bias = ptr(b);
  f.scale = ptr(sc), f.shift = ptr(sh), f.eps = c.eps, f.mean = mean.data(), f.rstd = rstd.data();
  if (N * G > 0) launch(N * G, [&] { stats_kernel<T>(f); });
  if (total > 0) launch(elem_blocks, [&] { apply_kernel<T>(f); });

  std::vector<A> gw = nan_buffer<A>(C), gb = nan_buffer<A>(C), gsc = nan_buffer<A>(N * C),
                 gsh = nan_buffer<A>(N * C), work = nan_buffer<A>(2 * N * C + 2 * N * G);
  GroupNormActBwdParams p;
  p.s = s, p.grad_out = dy.data(), p.x = x.data(), p.grad_x = dx.data(), p.weight = ptr(w);
  p.bias = ptr(b), p.scale = ptr(sc), p.shift = ptr(sh), p.mean = mean.data(), p.rstd = rstd.data();
  p.grad_weight = gw.data(), p.grad_bias = gb.data(), p.grad_scale = gsc.data();
  p.grad_shift = gsh.data(), p.work = work.data();
  if (N * G > 0) launch(N * G, [&] { channel_sums_kernel<T>(p); });
  if (total > 0) launch(elem_blocks, [&] { grad_x_kernel<T>(p); });
  if (C > 0) launch((C + kThreads - 1) / kThreads, [&] { param_grads_kernel<A>(p); });

  write_doubles(out, y, total);
  write_doubles(out, mean, N * G);
  write_doubles(out, rstd, N * G);
  write_doubles(out, dx, total);
  write_doubles(out, gw, C);
  write_doubles(out, gb, C);
  write_doubles(out, gsc, N * C);
  write_doubles(out, gsh, N * C);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: group_norm_emulation CASE OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  Case c;
  bool ok = read_all(in, c.h, sizeof c.h) && read_all(in, &c.eps, sizeof c.eps);
  const int64_t N = c.h[1], C = c.h[2], S = c.h[3];
  const auto arr = [&](std::vector<double>& v, int64_t n, bool present) {
    if (!present) return;
    v.resize(static_cast<size_t>(n));
    ok = ok && read_all(in, v.data(), sizeof(double) * static_cast<size_t>(n));
  };
  arr(c.x, N * C * S, true);
  arr(c.dy, N * C * S, true);
  arr(c.w, C, c.h[7] != 0);
  arr(c.b, C, c.h[8] != 0);
  arr(c.sc, N * C, c.h[9] != 0);
  arr(c.sh, N * C, c.h[10] != 0);
  std::fclose(in);
  if (!ok) {
    std::fprintf(stderr, "short case file\n");
    return 2;
  }
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  int rc = 2;
  switch (c.h[0]) {
    case 0: rc = run<float>(c, out); break;
    case 1: rc = run<double>(c, out); break;
    case 2: rc = run<__half>(c, out); break;
    case 3: rc = run<__nv_bfloat16>(c, out); break;
    default: std::fprintf(stderr, "unknown dtype code %lld\n", static_cast<long long>(c.h[0]));
  }
  std::fclose(out);
  return rc;
}

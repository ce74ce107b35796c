// csrc/cuda/attention_bwd.cu — launchers of the fused attention's backward kernels
// (attention_bwd_kernel.cuh, where the algorithm is described). CUDA C++17, no torch.
#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/attention_bwd_kernel.cuh"

namespace iddpm::cuda {
namespace {

using namespace attn_kernels;

// Names one kernel instance for set_smem_limit_once.
template <class T, int Cp, Prec P, bool kTileMajor>
struct BwdKernel {};

// The kernels of tile width Cp for head dim p.s.C <= Cp, products under P, the main one on the
// grid [B·H, key tiles, slices] or, kTileMajor, [key tiles, B·H, slices].
template <class T, int Cp, Prec P, bool kTileMajor>
int launch_bwd_grid(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t BH = p.s.B * p.s.H, T_len = p.s.T;
  const int C = static_cast<int>(p.s.C);
  const T* dout = static_cast<const T*>(p.grad_out);
  const T* qkv = static_cast<const T*>(p.qkv);
  T* grad_qkv = static_cast<T*>(p.grad_qkv);
  using Cfg = BwdCfg<T, Cp>;
  const int Ti = static_cast<int>(T_len);
  auto kernel = attn_bwd_kernel<T, Cp, P, kTileMajor>;
  cudaError_t err = set_smem_limit_once<BwdKernel<T, Cp, P, kTileMajor>>(
      reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (const int e = launch_bwd_prologue<T>(p, stream)) return e;
  constexpr int E = 16 / sizeof(T);
  const bool vec = T_len % E == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout) % 16 == 0;
  // gridDim.z: the channel slices of Cfg::CA (2 for C > 128, else 1).
  const auto tiles_k = static_cast<unsigned>((T_len + Cfg::BK - 1) / Cfg::BK);
  const auto slices = static_cast<unsigned>((C + Cfg::CA - 1) / Cfg::CA);
  const dim3 grid = kTileMajor ? dim3(tiles_k, static_cast<unsigned>(BH), slices)
                               : dim3(static_cast<unsigned>(BH), tiles_k, slices);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      qkv, dout, static_cast<const float*>(p.lse), p.delta, grad_qkv, p.dq_accum, C, Ti,
      attn::softmax_scale<float>(C), attn::logit_scale_log2<float>(C), vec);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return launch_bwd_epilogue<T>(p, stream);
}

// p.tile_major: as launch_fwd (attention_fwd.cu), fp16 / bf16 only.
template <class T, int Cp, Prec P>
int launch_bwd(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (p.tile_major && p.s.B * p.s.H <= 65535) return launch_bwd_grid<T, Cp, P, true>(p, stream);
  }
  return launch_bwd_grid<T, Cp, P, false>(p, stream);
}

}  // namespace

int qkv_attention_bwd(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  if (p.s.B * p.s.H == 0 || p.s.T == 0) return 0;
  return with_compiled_kernel(p.dtype, p.s.C, p.allow_tf32, [&](auto elem, auto tile_dim) {
    using E = decltype(elem);
    return launch_bwd<typename E::type, decltype(tile_dim)::value, E::prec>(p, stream);
  });
}

int qkv_attention_bwd_smem_bytes(DType dtype, int64_t C) {
  return with_compiled_kernel(dtype, C, true, [](auto elem, auto tile_dim) {
    return static_cast<int>(
        BwdCfg<typename decltype(elem)::type, decltype(tile_dim)::value>::kSmemBytes);
  });
}

}  // namespace iddpm::cuda

// csrc/cuda/attention_fwd.cu — launcher of the fused attention's forward kernel
// (attention_fwd_kernel.cuh, where the algorithm is described). CUDA C++17, no torch.
#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/attention_fwd_kernel.cuh"

namespace iddpm::cuda {
namespace {

using namespace attn_kernels;

// Names one kernel instance for set_smem_limit_once.
template <class T, int Cp, Prec P, bool kTileMajor>
struct FwdKernel {};

// The kernel of tile width Cp for head dim p.s.C <= Cp, products under P, on the grid
// [B·H, tiles] or, kTileMajor, [tiles, B·H].
template <class T, int Cp, Prec P, bool kTileMajor>
int launch_fwd_grid(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  const int64_t BH = p.s.B * p.s.H, T_len = p.s.T;
  const int C = static_cast<int>(p.s.C);
  using Cfg = FwdCfg<T, Cp>;
  auto kernel = attn_fwd_kernel<T, Cp, P, kTileMajor>;
  const cudaError_t err = set_smem_limit_once<FwdKernel<T, Cp, P, kTileMajor>>(
      reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  constexpr int E = 16 / sizeof(T);
  const bool vec = T_len % E == 0 && reinterpret_cast<uintptr_t>(p.qkv) % 16 == 0;
  const auto tiles = static_cast<unsigned>((T_len + Cfg::BQ - 1) / Cfg::BQ);
  const dim3 grid =
      kTileMajor ? dim3(tiles, static_cast<unsigned>(BH)) : dim3(static_cast<unsigned>(BH), tiles);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      static_cast<const T*>(p.qkv), static_cast<T*>(p.out), static_cast<float*>(p.lse), C,
      static_cast<int>(T_len), attn::logit_scale_log2<float>(C), vec);
  return static_cast<int>(cudaGetLastError());
}

// p.tile_major takes the tile-major grid for fp16 / bf16 (the dtypes "auto" runs on CUDA; fp32
// keeps the default grid, which also halves the extra kernel instances) while B·H fits
// gridDim.y (65535).
template <class T, int Cp, Prec P>
int launch_fwd(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (p.tile_major && p.s.B * p.s.H <= 65535) return launch_fwd_grid<T, Cp, P, true>(p, stream);
  }
  return launch_fwd_grid<T, Cp, P, false>(p, stream);
}

}  // namespace

int qkv_attention_fwd(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  if (p.s.B * p.s.H == 0 || p.s.T == 0) return 0;
  return with_compiled_kernel(p.dtype, p.s.C, p.allow_tf32, [&](auto elem, auto tile_dim) {
    using E = decltype(elem);
    return launch_fwd<typename E::type, decltype(tile_dim)::value, E::prec>(p, stream);
  });
}

int qkv_attention_fwd_smem_bytes(DType dtype, int64_t C) {
  return with_compiled_kernel(dtype, C, true, [](auto elem, auto tile_dim) {
    return static_cast<int>(
        FwdCfg<typename decltype(elem)::type, decltype(tile_dim)::value>::kSmemBytes);
  });
}

int qkv_attention_kernel_arch() {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(
      &attr, reinterpret_cast<const void*>(attn_fwd_kernel<__half, 64, Prec::kNative>));
  return err == cudaSuccess ? attr.ptxVersion : -static_cast<int>(err);
}

}  // namespace iddpm::cuda

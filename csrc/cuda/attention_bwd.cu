// csrc/cuda/attention_bwd.cu — launchers of the fused attention's backward kernels
// (attention_bwd_kernel.cuh, where the algorithm is described). CUDA C++17, no torch.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/attention.h"
#include "cuda/attention_bwd_kernel.cuh"

namespace iddpm::cuda {
namespace {

using namespace attn_kernels;

template <class T, int C>
int launch_bwd(const void* dout, const void* qkv, const void* out, const float* lse,
               void* grad_qkv, float* dq_accum, float* delta, int64_t BH, int64_t T_len,
               cudaStream_t stream) {
  using Cfg = BwdCfg<T, C>;
  const int Ti = static_cast<int>(T_len);
  auto kernel = attn_bwd_kernel<T, C>;
  cudaError_t err = set_smem_limit_once<Cfg>(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaMemsetAsync(dq_accum, 0, BH * C * T_len * sizeof(float), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  {
    const int tiles = static_cast<int>((T_len + 127) / 128);
    attn_delta_kernel<T, C><<<static_cast<unsigned>(BH * tiles), 128, 0, stream>>>(
        static_cast<const T*>(dout), static_cast<const T*>(out), delta, Ti, tiles);
  }
  constexpr int E = 16 / sizeof(T);
  const bool vec = T_len % E == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>((T_len + Cfg::BK - 1) / Cfg::BK));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      static_cast<const T*>(qkv), static_cast<const T*>(dout), lse, delta,
      static_cast<T*>(grad_qkv), dq_accum, Ti, attn::softmax_scale<float>(C),
      attn::logit_scale_log2<float>(C), vec);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t n = BH * C * T_len;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535 * 8));
  attn_dq_kernel<T, C><<<blocks, 256, 0, stream>>>(dq_accum, static_cast<T*>(grad_qkv), BH, Ti,
                                                   attn::softmax_scale<float>(C));
  return static_cast<int>(cudaGetLastError());
}

template <class T>
int launch_bwd_dim(const void* dout, const void* qkv, const void* out, const float* lse,
                   void* grad_qkv, float* dq_accum, float* delta, int64_t BH, int64_t C,
                   int64_t T_len, cudaStream_t stream) {
  switch (C) {
    case 32: return launch_bwd<T, 32>(dout, qkv, out, lse, grad_qkv, dq_accum, delta, BH, T_len, stream);
    case 64: return launch_bwd<T, 64>(dout, qkv, out, lse, grad_qkv, dq_accum, delta, BH, T_len, stream);
    case 128: return launch_bwd<T, 128>(dout, qkv, out, lse, grad_qkv, dq_accum, delta, BH, T_len, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int qkv_attention_bwd(DType dtype, const void* grad_out, const void* qkv, const void* out,
                      const float* lse, void* grad_qkv, float* dq_accum, float* delta, int64_t B,
                      int64_t H, int64_t C, int64_t T_len, cudaStream_t stream) {
  const int64_t BH = B * H;
  if (BH == 0 || T_len == 0) return 0;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd_dim<float>(grad_out, qkv, out, lse, grad_qkv, dq_accum, delta, BH, C, T_len, stream);
    case DType::kFloat16:
      return launch_bwd_dim<__half>(grad_out, qkv, out, lse, grad_qkv, dq_accum, delta, BH, C, T_len, stream);
    case DType::kBFloat16:
      return launch_bwd_dim<__nv_bfloat16>(grad_out, qkv, out, lse, grad_qkv, dq_accum, delta, BH, C, T_len, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace iddpm::cuda

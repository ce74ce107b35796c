// csrc/cuda/attention_fwd.cu — launcher of the fused attention's forward kernel
// (attention_fwd_kernel.cuh, where the algorithm is described). CUDA C++17, no torch.
#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/attention_fwd_kernel.cuh"

namespace iddpm::cuda {
namespace {

using namespace attn_kernels;

template <class T, int C>
int launch_fwd(const void* qkv, void* out, float* lse, int64_t BH, int64_t T_len,
               cudaStream_t stream) {
  using Cfg = FwdCfg<T, C>;
  auto kernel = attn_fwd_kernel<T, C>;
  const cudaError_t err =
      set_smem_limit_once<Cfg>(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  constexpr int E = 16 / sizeof(T);
  const bool vec = T_len % E == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>((T_len + Cfg::BQ - 1) / Cfg::BQ));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      static_cast<const T*>(qkv), static_cast<T*>(out), lse, static_cast<int>(T_len),
      attn::logit_scale_log2<float>(C), vec);
  return static_cast<int>(cudaGetLastError());
}

template <class T>
int launch_fwd_dim(const void* qkv, void* out, float* lse, int64_t BH, int64_t C, int64_t T_len,
                   cudaStream_t stream) {
  switch (C) {
    case 32: return launch_fwd<T, 32>(qkv, out, lse, BH, T_len, stream);
    case 64: return launch_fwd<T, 64>(qkv, out, lse, BH, T_len, stream);
    case 128: return launch_fwd<T, 128>(qkv, out, lse, BH, T_len, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int qkv_attention_fwd(DType dtype, const void* qkv, void* out, float* lse, int64_t B,
                      int64_t H, int64_t C, int64_t T_len, cudaStream_t stream) {
  const int64_t BH = B * H;
  if (BH == 0 || T_len == 0) return 0;
  switch (dtype) {
    case DType::kFloat32: return launch_fwd_dim<float>(qkv, out, lse, BH, C, T_len, stream);
    case DType::kFloat16: return launch_fwd_dim<__half>(qkv, out, lse, BH, C, T_len, stream);
    case DType::kBFloat16: return launch_fwd_dim<__nv_bfloat16>(qkv, out, lse, BH, C, T_len, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace iddpm::cuda

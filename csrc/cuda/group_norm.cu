// csrc/cuda/group_norm.cu — the launchers of iddpm::group_norm_act and its backward (CUDA C++17,
// no torch): the kernels are in cuda/group_norm_kernel.cuh (emulated on the CPU by the tests).
// NOTE: not yet run on a GPU; the model uses these kernels on CUDA only when asked
// (iddpm_ext.nn.set_groupnorm_impl("fused")).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/group_norm.h"
#include "cuda/group_norm_kernel.cuh"

namespace iddpm::cuda {
namespace {

using namespace gn_kernels;

int elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? b : 65535 * 8);
}

template <class T>
int forward(const GroupNormActFwdParams& p, cudaStream_t stream) {
  const GroupNormShape& s = p.s;
  if (s.N * s.G > 0) stats_kernel<T><<<static_cast<unsigned>(s.N * s.G), kThreads, 0, stream>>>(p);
  const int64_t total = s.N * s.C * s.S;
  if (total > 0) apply_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <class T>
int backward(const GroupNormActBwdParams& p, cudaStream_t stream) {
  const GroupNormShape& s = p.s;
  if (s.N * s.G > 0) {
    channel_sums_kernel<T><<<static_cast<unsigned>(s.N * s.G), kThreads, 0, stream>>>(p);
  }
  const int64_t total = s.N * s.C * s.S;
  if (total > 0) grad_x_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(p);
  if (s.C > 0) {
    param_grads_kernel<Acc<T>>
        <<<static_cast<unsigned>((s.C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int group_norm_act_fwd(const GroupNormActFwdParams& p, cudaStream_t stream) {
  switch (p.s.dtype) {
    case DType::kFloat32: return forward<float>(p, stream);
    case DType::kFloat64: return forward<double>(p, stream);
    case DType::kFloat16: return forward<__half>(p, stream);
    case DType::kBFloat16: return forward<__nv_bfloat16>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int group_norm_act_bwd(const GroupNormActBwdParams& p, cudaStream_t stream) {
  switch (p.s.dtype) {
    case DType::kFloat32: return backward<float>(p, stream);
    case DType::kFloat64: return backward<double>(p, stream);
    case DType::kFloat16: return backward<__half>(p, stream);
    case DType::kBFloat16: return backward<__nv_bfloat16>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace iddpm::cuda

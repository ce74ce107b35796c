// csrc/cuda/convert.cuh — the element conversions of the elementwise CUDA kernels (step,
// group_norm): each dtype is read into its accumulation type (float for fp32/fp16/bf16,
// double for fp64) and rounded back to nearest-even once. (The attention kernels carry
// their own per-dtype traits, which the host emulator replaces.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace iddpm::cuda {

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_acc(Acc<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace iddpm::cuda

// csrc/cuda/attention_sm90_tma.h — host side of the Hopper attention kernels' TMA copies: the
// tensor map of a [rows, T] tensor of 16-bit elements (qkv as [B·3·H·C, T], dout as
// [B·H·C, T]) for boxes of [C × 64] positions with the 128-byte swizzle and zeros past T, made
// with cuTensorMapEncodeTiled reached through the runtime's driver entry point (libcuda is not
// linked). Included by the sm_90a launchers only (attention_fwd_sm90.cu, attention_bwd_sm90.cu).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/attention_sm90_common.cuh"

namespace iddpm::cuda::attn_sm90 {

// cuTensorMapEncodeTiled, fetched once; null when the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                             cudaEnableDefault, &q);
    return err == cudaSuccess && q == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p)
               : nullptr;
  }();
  return fn;
}

// The tensor map of `data` as [rows, T] for boxes of [C × 64] with the 128-byte swizzle (see
// tma_params); false when it cannot be made.
template <class T, int C>
bool make_tma_map(CUtensorMap* map, const void* data, int64_t rows, int64_t T_len) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr) return false;
  const TmaParams tp = tma_params<C>(rows, T_len);
  const cuuint64_t dims[2] = {tp.dim[0], tp.dim[1]};
  const cuuint64_t strides[1] = {tp.stride1};
  const cuuint32_t box[2] = {tp.box[0], tp.box[1]};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType dt = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                           : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, dt, 2, const_cast<void*>(data), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace iddpm::cuda::attn_sm90

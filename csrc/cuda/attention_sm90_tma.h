// csrc/cuda/attention_sm90_tma.h — host side of the Hopper attention launchers: the tensor map
// of a [rows, T] tensor of 16-bit elements (qkv as [B·3·H·C, T], dout as [B·H·C, T]) for boxes
// of [C × 64] positions with the 128-byte swizzle and zeros past T (and the backward's fp32
// dq_accum [B·H·C, T] for its bulk reductions, boxes of [64 × 32]), made with
// cuTensorMapEncodeTiled reached through the runtime's driver entry point (libcuda is not
// linked), and the check of a kernel's setmaxnreg budget. Included by the sm_90a launchers only
// (attention_fwd_sm90.cu, attention_bwd_sm90.cu).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
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

// A rank-2 tensor map of `data` with the parameters tp, the 128-byte swizzle and (for loads)
// zeros out of bounds; false when it cannot be made.
inline bool encode_2d(CUtensorMap* map, CUtensorMapDataType dt, const void* data,
                      const TmaParams& tp) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {tp.dim[0], tp.dim[1]};
  const cuuint64_t strides[1] = {tp.stride1};
  const cuuint32_t box[2] = {tp.box[0], tp.box[1]};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, dt, 2, const_cast<void*>(data), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor map of `data` as [rows, T] for boxes of [C × 64] with the 128-byte swizzle (see
// tma_params); false when it cannot be made.
template <class T, int C>
bool make_tma_map(CUtensorMap* map, const void* data, int64_t rows, int64_t T_len) {
  return encode_2d(map,
                   std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                             : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                   data, tma_params<C>(rows, T_len));
}

// The tensor map of the backward's dq_accum as [rows, T] fp32 for its bulk reductions: boxes of
// [64 rows × 32 positions] with the 128-byte swizzle (tma_params_dq); false when it cannot be
// made.
inline bool make_tma_map_dq(CUtensorMap* map, float* dq_accum, int64_t rows, int64_t T_len) {
  return encode_2d(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, dq_accum, tma_params_dq(rows, T_len));
}

// The kernel (one producer warpgroup going down to producer_regs registers per thread, the other
// threads - 128 going up to consumer_regs) was compiled with a per-thread register count that
// lets the producer's release cover the consumers' requests: setmaxnreg.inc waits until the CTA's
// pool has the registers, so a build whose count differs (ptxas gives 168 under the launch bound
// of 384 threads) would hang instead of failing. Asked of the runtime once per kernel (Tag).
template <class Tag>
cudaError_t check_register_budget(const void* kernel, int threads, int producer_regs,
                                  int consumer_regs) {
  static std::atomic<int> known{0};  // 0: not asked yet, else the cudaError_t + 1
  int k = known.load(std::memory_order_relaxed);
  if (k == 0) {
    cudaFuncAttributes a{};
    cudaError_t err = cudaFuncGetAttributes(&a, kernel);
    if (err == cudaSuccess) {
      const int64_t regs = a.numRegs;
      const bool fits =
          regs >= producer_regs && regs <= consumer_regs &&
          regs * threads >= int64_t{128} * producer_regs + int64_t{threads - 128} * consumer_regs;
      err = fits ? cudaSuccess : cudaErrorInvalidConfiguration;
    }
    k = static_cast<int>(err) + 1;
    known.store(k, std::memory_order_relaxed);
  }
  return static_cast<cudaError_t>(k - 1);
}

}  // namespace iddpm::cuda::attn_sm90

// csrc/cuda/attention.h — CUDA launchers of the fused QKV attention over raw pointers and a
// stream, and what they support. Plain C++ (no torch, no CUDA headers) so the glue in csrc/ops
// and python/module.cpp can include it.
//
// Layout (common/attention_params.h): qkv [B, 3·H·C, T] contiguous, head h = channels
// [3Ch, 3Ch + 3C) = q | k | v; out [B, H·C, T]; lse [B, H, T] f32; grad_qkv [B, 3·H·C, T].
#pragma once

#include <cstdint>

#include "common/attention_params.h"
#include "common/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace iddpm::cuda {

// The dtypes of qkv with a kernel.
inline constexpr DType kAttentionDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Head dims C with a compiled kernel (attention_fwd.cu and attention_bwd.cu instantiate
// their kernels for exactly these).
inline constexpr int kAttentionHeadDims[] = {32, 64, 128};

// At most this many positions T: one CTA per 64 queries along gridDim.y (at most 65535).
inline constexpr int64_t kAttentionMaxPositions = int64_t{65535} * 64;

// At most this many batch items × heads B·H: one CTA per (item, head) along gridDim.x.
inline constexpr int64_t kAttentionMaxBatchHeads = int64_t{2147483647};

inline bool qkv_attention_head_dim_supported(int64_t C) {
  for (const int c : kAttentionHeadDims) {
    if (C == c) return true;
  }
  return false;
}

// Forward (lse: float32). Returns a cudaError_t value (0 = success) of the launches.
int qkv_attention_fwd(const attn::AttentionFwdParams& params, cudaStream_t stream);

// Backward, with the workspaces params.dq_accum and params.delta (lse: float32). Returns a
// cudaError_t value (0 = success) of the launches.
int qkv_attention_bwd(const attn::AttentionBwdParams& params, cudaStream_t stream);

}  // namespace iddpm::cuda

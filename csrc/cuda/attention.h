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

// Head dims C with a kernel: every multiple of kAttentionHeadDimStep from it up to
// kAttentionMaxHeadDim. A head dim runs on the kernel compiled for the smallest tile width
// Cp >= C of kAttentionTileDims (attention_fwd.cu and attention_bwd.cu instantiate their
// kernels for exactly these), with channels C..Cp-1 zero-filled in shared memory and never
// stored; C == Cp takes the kernel's plain path.
inline constexpr int kAttentionHeadDimStep = 8;
inline constexpr int kAttentionMaxHeadDim = 256;
inline constexpr int kAttentionTileDims[] = {32, 64, 128, 256};

inline bool qkv_attention_head_dim_supported(int64_t C) {
  return C >= kAttentionHeadDimStep && C <= kAttentionMaxHeadDim && C % kAttentionHeadDimStep == 0;
}

// The tile width Cp a supported head dim C runs on (0 for an unsupported one).
inline int qkv_attention_tile_dim(int64_t C) {
  if (!qkv_attention_head_dim_supported(C)) return 0;
  for (const int cp : kAttentionTileDims) {
    if (C <= cp) return cp;
  }
  return 0;
}

// Every supported head dim, ascending (what capabilities() lists).
struct AttentionHeadDimList {
  int v[kAttentionMaxHeadDim / kAttentionHeadDimStep];
};
constexpr AttentionHeadDimList attention_head_dim_list() {
  AttentionHeadDimList l{};
  for (int i = 0; i < kAttentionMaxHeadDim / kAttentionHeadDimStep; ++i) {
    l.v[i] = kAttentionHeadDimStep * (i + 1);
  }
  return l;
}
inline constexpr AttentionHeadDimList kAttentionHeadDims = attention_head_dim_list();

// At most this many positions T: one CTA per 64 queries along gridDim.y (at most 65535).
inline constexpr int64_t kAttentionMaxPositions = int64_t{65535} * 64;

// At most this many batch items × heads B·H: one CTA per (item, head) along gridDim.x.
inline constexpr int64_t kAttentionMaxBatchHeads = int64_t{2147483647};

// Forward (lse: float32). Returns a cudaError_t value (0 = success) of the launches.
int qkv_attention_fwd(const attn::AttentionFwdParams& params, cudaStream_t stream);

// The virtual architecture (10·major + minor, e.g. 80, 90) that the sm_80 kernels' code running
// on the current device was compiled for (its PTX version: a cubin's own, or the PTX the driver
// compiled for this device), or -(cudaError_t) if that cannot be read (no kernel image for this
// device). Below kAttentionMinArch the kernels' bodies are empty (they trap): do not launch.
int qkv_attention_kernel_arch();
inline constexpr int kAttentionMinArch = 80;

// Dynamic shared memory per block (bytes) of the sm_80 forward / backward kernel for this dtype
// and head dim C (its tile width's config), to hold against the device's opt-in limit: the
// kernels are sized for the H100's 227 KB; the A100's 163 KB is short for fp32 at tile width 128
// (forward) and 256, the 99 KB of sm_86 / sm_89 cards for tile width 256. C must be supported.
int qkv_attention_fwd_smem_bytes(DType dtype, int64_t C);
int qkv_attention_bwd_smem_bytes(DType dtype, int64_t C);

// The Hopper (sm_90a) forward and backward (attention_fwd_sm90.cu, attention_bwd_sm90.cu; built
// only for sm_90a, see IDDPM_WITH_SM90, never run on a card yet, never the default): fp16 / bf16,
// head dims 64 and 128, the same outputs as qkv_attention_fwd / qkv_attention_bwd (so either
// backward takes either forward's lse), the same workspaces.
inline bool qkv_attention_sm90_supported(DType dtype, int64_t C) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && (C == 64 || C == 128);
}
int qkv_attention_fwd_sm90(const attn::AttentionFwdParams& params, cudaStream_t stream);
int qkv_attention_bwd_sm90(const attn::AttentionBwdParams& params, cudaStream_t stream);

// Backward, with the workspaces params.dq_accum and params.delta (lse: float32). Returns a
// cudaError_t value (0 = success) of the launches.
int qkv_attention_bwd(const attn::AttentionBwdParams& params, cudaStream_t stream);

}  // namespace iddpm::cuda

// csrc/common/attention_params.h — the plain argument blocks of the fused QKV attention
// (iddpm::qkv_attention and qkv_attention_backward). No torch and no CUDA types: the glue in
// csrc/ops fills them, csrc/cpu and csrc/cuda read them.
//
// Layout (the UNet's own, as the reference reshapes it):
//   qkv:      [B, 3·H·C, T] contiguous; head h owns channels [3Ch, 3Ch + 3C): q | k | v,
//             each a [C, T] block with T contiguous.
//   out:      [B, H·C, T] contiguous, dtype of qkv.
//   lse:      [B, H, T] contiguous, natural-log logsumexp of the scaled logits; float64 for
//             float64 inputs (CPU, so that the recomputed probabilities are exact), else float32.
//   grad_qkv: [B, 3·H·C, T] contiguous, same interleaved layout as qkv.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace iddpm::attn {

struct AttentionShape {
  int64_t B = 0, H = 0, C = 0, T = 0;  // batch, heads, head dim, positions
};

struct AttentionFwdParams {
  DType dtype = DType::kFloat32;  // of qkv and out
  AttentionShape s;
  const void* qkv = nullptr;  // [B, 3·H·C, T]
  void* out = nullptr;        // [B, H·C, T]
  void* lse = nullptr;        // [B, H, T] float32 (float64 for float64 qkv)
  // CUDA, fp32 only: products on TF32 tensor cores (the caller allows TF32, as
  // torch.backends.cuda.matmul.allow_tf32); false: split-TF32, accurate to about fp32.
  bool allow_tf32 = false;
  // CUDA, sm_80 kernels: launch a head's tiles adjacent (grid [tiles, B·H], FlashAttention's
  // order, for L2 reuse of its k, v) instead of the heads adjacent (grid [B·H, tiles]). Same
  // results either way (each CTA computes the same tile); opt-in until timed on a card.
  bool tile_major = false;
  // CUDA, sm_90a forward (when it runs): the pipelined consumers (a batch's S with the previous
  // tile's P·vᵀ in flight during the softmax, the two consumer warpgroups taking turns; more
  // stages) instead of the plain ones. Same math; opt-in until timed on a card.
  bool sm90_pipelined = false;
};

struct AttentionBwdParams {
  DType dtype = DType::kFloat32;  // of qkv, grad_out, out and grad_qkv
  AttentionShape s;
  const void* grad_out = nullptr;  // [B, H·C, T]
  const void* qkv = nullptr;       // [B, 3·H·C, T]
  const void* out = nullptr;       // [B, H·C, T], the forward's
  const void* lse = nullptr;       // [B, H, T], the forward's
  void* grad_qkv = nullptr;        // [B, 3·H·C, T]
  // CUDA only: workspaces allocated by the caller (any content).
  float* dq_accum = nullptr;  // [B·H, C, T] float32
  float* delta = nullptr;     // [B·H, T] float32
  bool allow_tf32 = false;    // as AttentionFwdParams::allow_tf32
  bool tile_major = false;    // as AttentionFwdParams::tile_major (key tiles)
  // CUDA, sm_90a backward (when it runs): dq added to dq_accum by TMA bulk reductions from
  // shared memory (where T % 4 == 0) instead of per-element atomics. Same sums up to their
  // order; opt-in until timed on a card.
  bool sm90_bulk_dq = false;
};

// The bf16 inference forward (iddpm::qkv_attention_bf16, CPU): qkv at any strides (fastest
// token-major, channel stride 1: the layout a 1×1 conv of channels-last activations gives, read in
// place), out written token-major. No lse (no backward).
//   qkv: element (b, ch, t) of [B, 3·H·C, T] at qkv[b·qkv_sb + ch·qkv_sc + t·qkv_st], bf16; head h
//        owns channels [3Ch, 3Ch + 3C): q | k | v, as above.
//   out: element (b, h·C + c, t) of [B, H·C, T] at out[b·out_sb + t·out_st + h·C + c], bf16.
struct AttentionBf16Params {
  AttentionShape s;
  const void* qkv = nullptr;
  int64_t qkv_sb = 0, qkv_sc = 0, qkv_st = 0;  // in elements
  void* out = nullptr;
  int64_t out_sb = 0, out_st = 0;  // in elements
};

}  // namespace iddpm::attn

// csrc/cpu/attention.h — CPU kernels of the fused QKV attention (iddpm::qkv_attention and
// iddpm::qkv_attention_backward) over raw pointers. No tensor types here.
//
// Layout (the UNet's own, as the reference reshapes it):
//   qkv:      [B, 3·H·C, T] contiguous; head h owns channels [3Ch, 3Ch + 3C): q | k | v,
//             each a [C, T] block with T contiguous.
//   out:      [B, H·C, T] contiguous, dtype of qkv.
//   lse:      [B, H, T] contiguous, natural-log logsumexp of the scaled logits; float64 for
//             float64 inputs (so that the recomputed probabilities are exact), else float32.
//   grad_qkv: [B, 3·H·C, T] contiguous, same interleaved layout as qkv.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace iddpm::cpu {

// The dtypes of qkv with a kernel (any head dim C >= 1).
inline constexpr DType kAttentionDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                             DType::kBFloat16};

struct AttnShape {
  int64_t B, H, C, T;
};

// Forward: out = softmax(qᵀk / sqrt(C)) applied to v, per (batch, head); lse as above.
// Accumulates in float (double for f64 inputs); f16/bf16 are upcast block by block.
void qkv_attention_fwd(DType dtype, const void* qkv, void* out, void* lse, AttnShape s);

// Backward: grad_qkv from grad_out [B, H·C, T], the forward's out and lse.
void qkv_attention_bwd(DType dtype, const void* grad_out, const void* qkv, const void* out,
                       const void* lse, void* grad_qkv, AttnShape s);

// The vector instruction set the kernels run with on this machine: "avx512", "avx2" or
// "generic". The environment variable IDDPM_ATTN_CPU_ISA (same names) forces a lower one.
const char* qkv_attention_isa();

}  // namespace iddpm::cpu

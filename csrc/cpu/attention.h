// csrc/cpu/attention.h — CPU kernels of the fused QKV attention (iddpm::qkv_attention and
// iddpm::qkv_attention_backward) over raw pointers. No tensor types here; the layouts are
// those of common/attention_params.h.
#pragma once

#include "common/attention_params.h"
#include "common/dtype.h"

namespace iddpm::cpu {

// The dtypes of qkv with a kernel (any head dim C >= 1).
inline constexpr DType kAttentionDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                             DType::kBFloat16};

// Forward: out = softmax(qᵀk / sqrt(C)) applied to v, per (batch, head); lse as described in
// common/attention_params.h. Accumulates in float (double for float64 inputs); float16 and
// bfloat16 are upcast block by block.
void qkv_attention_fwd(const attn::AttentionFwdParams& params);

// Backward: grad_qkv from grad_out [B, H·C, T], the forward's out and lse.
void qkv_attention_bwd(const attn::AttentionBwdParams& params);

// The vector instruction set the kernels run with on this machine: "avx512", "avx2" or
// "generic". The environment variable IDDPM_ATTN_CPU_ISA (same names) forces a lower one.
const char* qkv_attention_isa();

// The bf16 inference forward (iddpm::qkv_attention_bf16; layouts in common/attention_params.h):
// out = softmax(qᵀk / sqrt(C)) applied to v, bf16 pair dot products into float32, probabilities
// and out rounded once each to bf16. No lse.
inline constexpr DType kAttentionBf16Dtypes[] = {DType::kBFloat16};
void qkv_attention_bf16_fwd(const attn::AttentionBf16Params& params);

// Its build run here: "avx512_bf16" (AVX512-BF16 products), "avx512", "avx2" or "generic" (the
// same sums in float32 multiply-adds); IDDPM_ATTN_CPU_ISA=avx512/avx2/generic forces a lower one.
const char* qkv_attention_bf16_isa();

}  // namespace iddpm::cpu

// csrc/cpu/attention_isa.h — entry points that each vector-ISA build of the CPU attention
// kernel (attention_isa_generic.cpp, attention_isa_avx2.cpp, attention_isa_avx512.cpp)
// provides; csrc/cpu/attention.cpp picks one at run time and parallelizes over them.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace iddpm::cpu {

// The bf16 inference forward (iddpm::qkv_attention_bf16): tasks [begin, end) of B·H·q_chunks,
// as the forward's; every build has it, isa_avx512bf16 only it (with AVX512-BF16 products).
#define IDDPM_ATTN_DECLARE_BF16(ns)                                                             \
  void attn_bf16_fwd_tasks(const attn::AttentionBf16Params& p, int64_t q_chunks, int64_t begin, \
                           int64_t end);                                                        \
  int64_t attn_bf16_query_block();

// Forward tasks [begin, end) of B·H·q_chunks: task = bh · q_chunks + chunk, where each (b, h)
// is split into q_chunks chunks of query blocks. Backward heads [begin, end) of B·H.
#define IDDPM_ATTN_DECLARE_ISA(ns)                                                        \
  namespace ns {                                                                          \
  void attn_fwd_tasks(const attn::AttentionFwdParams& p, int64_t q_chunks, int64_t begin, \
                      int64_t end);                                                       \
  void attn_bwd_heads(const attn::AttentionBwdParams& p, int64_t begin, int64_t end);     \
  int64_t attn_query_block();                                                             \
  IDDPM_ATTN_DECLARE_BF16(ns)                                                             \
  }

IDDPM_ATTN_DECLARE_ISA(isa_generic)
#if defined(__x86_64__)
IDDPM_ATTN_DECLARE_ISA(isa_avx2)
IDDPM_ATTN_DECLARE_ISA(isa_avx512)
namespace isa_avx512bf16 {
IDDPM_ATTN_DECLARE_BF16(isa_avx512bf16)
}
#endif

#undef IDDPM_ATTN_DECLARE_ISA
#undef IDDPM_ATTN_DECLARE_BF16

}  // namespace iddpm::cpu

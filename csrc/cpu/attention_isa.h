// csrc/cpu/attention_isa.h — entry points that each vector-ISA build of the CPU attention
// kernel (attention_isa_generic.cpp, attention_isa_avx2.cpp, attention_isa_avx512.cpp)
// provides; csrc/cpu/attention.cpp picks one at run time and parallelizes over them.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace iddpm::cpu {

// Forward tasks [begin, end) of B·H·q_chunks: task = bh · q_chunks + chunk, where each (b, h)
// is split into q_chunks chunks of query blocks. Backward heads [begin, end) of B·H.
#define IDDPM_ATTN_DECLARE_ISA(ns)                                                        \
  namespace ns {                                                                          \
  void attn_fwd_tasks(const attn::AttentionFwdParams& p, int64_t q_chunks, int64_t begin, \
                      int64_t end);                                                       \
  void attn_bwd_heads(const attn::AttentionBwdParams& p, int64_t begin, int64_t end);     \
  int64_t attn_query_block();                                                             \
  }

IDDPM_ATTN_DECLARE_ISA(isa_generic)
#if defined(__x86_64__)
IDDPM_ATTN_DECLARE_ISA(isa_avx2)
IDDPM_ATTN_DECLARE_ISA(isa_avx512)
#endif

#undef IDDPM_ATTN_DECLARE_ISA

}  // namespace iddpm::cpu

// csrc/cpu/attention_isa.h — entry points that each vector-ISA build of the CPU attention
// kernel (attention_isa_generic.cpp, attention_isa_avx2.cpp, attention_isa_avx512.cpp)
// provides; csrc/cpu/attention.cpp picks one at run time and parallelizes over them.
#pragma once

#include <cstdint>

#include "cpu/attention.h"

namespace iddpm::cpu {

struct AttnFwdArgs {
  DType dtype;
  const void* qkv;  // [B, 3HC, T]
  void* out;        // [B, HC, T]
  void* lse;        // [B, H, T] f32 (f64 for f64 inputs)
  AttnShape s;
  int64_t q_chunks;  // each (b, h) is split into this many chunks of query blocks
};

struct AttnBwdArgs {
  DType dtype;
  const void* grad_out;  // [B, HC, T]
  const void* qkv;       // [B, 3HC, T]
  const void* out;       // [B, HC, T]
  const void* lse;       // [B, H, T] f32 (f64 for f64 inputs)
  void* grad_qkv;        // [B, 3HC, T]
  AttnShape s;
};

// Forward tasks [begin, end) of B·H·q_chunks: task = bh · q_chunks + chunk.
// Backward heads [begin, end) of B·H.
#define IDDPM_ATTN_DECLARE_ISA(ns)                                              \
  namespace ns {                                                                \
  void attn_fwd_tasks(const AttnFwdArgs& a, int64_t begin, int64_t end);       \
  void attn_bwd_heads(const AttnBwdArgs& a, int64_t begin, int64_t end);       \
  int64_t attn_query_block();                                                   \
  }

IDDPM_ATTN_DECLARE_ISA(isa_generic)
#if defined(__x86_64__)
IDDPM_ATTN_DECLARE_ISA(isa_avx2)
IDDPM_ATTN_DECLARE_ISA(isa_avx512)
#endif

#undef IDDPM_ATTN_DECLARE_ISA

}  // namespace iddpm::cpu

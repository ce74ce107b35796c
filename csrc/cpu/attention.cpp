// csrc/cpu/attention.cpp — picks the vector-ISA build of the CPU attention kernel and
// parallelizes it: the forward over (batch·head, chunk of query blocks), the backward over
// batch·head (each head's dk, dv, dq are accumulated by one thread, so no reduction).
#include "cpu/attention.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

#include "cpu/attention_isa.h"

namespace iddpm::cpu {
namespace {

enum class Isa { generic, avx2, avx512 };

Isa best_isa() {
#if defined(__x86_64__)
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return Isa::avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::generic;
  }();
  Isa isa = hw;
  // A lower ISA can be forced (tests run every build this machine can execute).
  if (const char* env = std::getenv("IDDPM_ATTN_CPU_ISA")) {
    if (std::strcmp(env, "generic") == 0) isa = Isa::generic;
    if (std::strcmp(env, "avx2") == 0 && isa == Isa::avx512) isa = Isa::avx2;
  }
  return isa;
#else
  return Isa::generic;
#endif
}

}  // namespace

const char* qkv_attention_isa() {
  switch (best_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

void qkv_attention_fwd(const attn::AttentionFwdParams& p) {
  const attn::AttentionShape& s = p.s;
  const int64_t BH = s.B * s.H;
  if (BH == 0 || s.T == 0) return;
  const Isa isa = best_isa();
  auto run = isa_generic::attn_fwd_tasks;
  int64_t bq = isa_generic::attn_query_block();
#if defined(__x86_64__)
  if (isa == Isa::avx512) run = isa_avx512::attn_fwd_tasks, bq = isa_avx512::attn_query_block();
  if (isa == Isa::avx2) run = isa_avx2::attn_fwd_tasks, bq = isa_avx2::attn_query_block();
#endif
  // Split heads into chunks of query blocks only when there are fewer heads than threads
  // (each chunk converts k and v of its head again, which is cheap next to the products).
  const int64_t nqb = (s.T + bq - 1) / bq;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (BH < threads) chunks = std::min<int64_t>(nqb, (threads + BH - 1) / BH);
  at::parallel_for(0, BH * chunks, 1,
                   [&](int64_t begin, int64_t end) { run(p, chunks, begin, end); });
}

void qkv_attention_bwd(const attn::AttentionBwdParams& p) {
  const int64_t BH = p.s.B * p.s.H;
  if (BH == 0 || p.s.T == 0) return;
  const Isa isa = best_isa();
  auto run = isa_generic::attn_bwd_heads;
#if defined(__x86_64__)
  if (isa == Isa::avx512) run = isa_avx512::attn_bwd_heads;
  if (isa == Isa::avx2) run = isa_avx2::attn_bwd_heads;
#endif
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
}

}  // namespace iddpm::cpu

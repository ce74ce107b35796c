// csrc/cpu/attention.cpp — picks the vector-ISA build of the CPU attention kernel and
// parallelizes it: the forward over (batch·head, chunk of query blocks), the backward over
// batch·head (each head's dk, dv, dq are accumulated by one thread, so no reduction).
#include "cpu/attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/attention_isa.h"

namespace iddpm::cpu {
namespace {

// avx512bf16: avx512 with AVX512-BF16 (only the bf16 inference forward has a build for it; the
// other kernels run their avx512 build there).
enum class Isa { generic, avx2, avx512, avx512bf16 };

Isa best_isa() {
#if defined(__x86_64__)
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) {
        return Isa::avx512bf16;
      }
      return Isa::avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::generic;
  }();
  Isa isa = hw;
  // A lower ISA can be forced (tests run every build this machine can execute). Read per call:
  // tests switch it.
  if (const char* env = std::getenv("IDDPM_ATTN_CPU_ISA")) {
    if (std::strcmp(env, "generic") == 0) isa = Isa::generic;
    if (std::strcmp(env, "avx2") == 0 && isa >= Isa::avx2) isa = Isa::avx2;
    if (std::strcmp(env, "avx512") == 0 && isa >= Isa::avx512) isa = Isa::avx512;
  }
  return isa;
#else
  return Isa::generic;
#endif
}

// How many chunks of query blocks each (batch, head) is split into: more than one only when
// there are fewer heads than threads (each chunk packs k and v of its head again, which is cheap
// next to the products).
int64_t query_chunks(int64_t BH, int64_t T, int64_t block) {
  const int64_t nqb = (T + block - 1) / block;
  const int64_t threads = at::get_num_threads();
  if (BH >= threads) return 1;
  return std::min<int64_t>(nqb, (threads + BH - 1) / BH);
}

}  // namespace

const char* qkv_attention_isa() {
  switch (best_isa()) {
    case Isa::avx512bf16:  // the fused op's kernels have no avx512bf16 build
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

const char* qkv_attention_bf16_isa() {
  switch (best_isa()) {
    case Isa::avx512bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

void qkv_attention_bf16_fwd(const attn::AttentionBf16Params& p) {
  const attn::AttentionShape& s = p.s;
  const int64_t BH = s.B * s.H;
  if (BH == 0 || s.T == 0) return;
  const Isa isa = best_isa();
  auto run = isa_generic::attn_bf16_fwd_tasks;
  int64_t bq = isa_generic::attn_bf16_query_block();
#if defined(__x86_64__)
  if (isa == Isa::avx512bf16) {
    run = isa_avx512bf16::attn_bf16_fwd_tasks, bq = isa_avx512bf16::attn_bf16_query_block();
  }
  if (isa == Isa::avx512)
    run = isa_avx512::attn_bf16_fwd_tasks, bq = isa_avx512::attn_bf16_query_block();
  if (isa == Isa::avx2) run = isa_avx2::attn_bf16_fwd_tasks, bq = isa_avx2::attn_bf16_query_block();
#endif
  const int64_t chunks = query_chunks(BH, s.T, bq);
  at::parallel_for(0, BH * chunks, 1,
                   [&](int64_t begin, int64_t end) { run(p, chunks, begin, end); });
}

void qkv_attention_fwd(const attn::AttentionFwdParams& p) {
  const attn::AttentionShape& s = p.s;
  const int64_t BH = s.B * s.H;
  if (BH == 0 || s.T == 0) return;
  const Isa isa = best_isa();
  auto run = isa_generic::attn_fwd_tasks;
  int64_t bq = isa_generic::attn_query_block();
#if defined(__x86_64__)
  if (isa >= Isa::avx512) run = isa_avx512::attn_fwd_tasks, bq = isa_avx512::attn_query_block();
  if (isa == Isa::avx2) run = isa_avx2::attn_fwd_tasks, bq = isa_avx2::attn_query_block();
#endif
  const int64_t chunks = query_chunks(BH, s.T, bq);
  at::parallel_for(0, BH * chunks, 1,
                   [&](int64_t begin, int64_t end) { run(p, chunks, begin, end); });
}

void qkv_attention_bwd(const attn::AttentionBwdParams& p) {
  const int64_t BH = p.s.B * p.s.H;
  if (BH == 0 || p.s.T == 0) return;
  const Isa isa = best_isa();
  auto run = isa_generic::attn_bwd_heads;
#if defined(__x86_64__)
  if (isa >= Isa::avx512) run = isa_avx512::attn_bwd_heads;
  if (isa == Isa::avx2) run = isa_avx2::attn_bwd_heads;
#endif
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
}

}  // namespace iddpm::cpu

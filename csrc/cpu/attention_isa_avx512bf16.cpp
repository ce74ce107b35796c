// csrc/cpu/attention_isa_avx512bf16.cpp — the CPU bf16 inference attention forward
// (cpu/attention_bf16_kernel.inc) alone, its pair dot products as AVX512-BF16 VDPBF16PS
// instructions; csrc/cpu/attention.cpp calls it only when the CPU has avx512_bf16.
#if defined(__x86_64__)
#include <immintrin.h>

#define IDDPM_ATTN_ISA isa_avx512bf16
#define IDDPM_ATTN_TARGET "avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma"
#define IDDPM_VB 64
#define IDDPM_MR 12
#define IDDPM_ATTN_BF16_ONLY
#define IDDPM_ATTN_BF16_NATIVE
#include "cpu/attention_isa.inc"
#endif

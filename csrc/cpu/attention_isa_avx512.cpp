// csrc/cpu/attention_isa_avx512.cpp — the CPU attention kernel (cpu/attention_kernel.inc) built
// for avx512 (64-byte vectors); csrc/cpu/attention.cpp calls it only when the CPU has avx512.
#if defined(__x86_64__)
#define IDDPM_ATTN_ISA isa_avx512
#define IDDPM_ATTN_TARGET "avx512f,avx512vl,avx512dq,avx2,fma"
#define IDDPM_VB 64
#define IDDPM_MR 12
#include "cpu/attention_isa.inc"
#endif

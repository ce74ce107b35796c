// csrc/cpu/attention_isa_avx2.cpp — the CPU attention kernel (cpu/attention_kernel.inc) built for
// avx2 (32-byte vectors); csrc/cpu/attention.cpp calls it only when the CPU has avx2.
#if defined(__x86_64__)
#define IDDPM_ATTN_ISA isa_avx2
#define IDDPM_ATTN_TARGET "avx2,fma"
#define IDDPM_VB 32
#define IDDPM_MR 6
#include "cpu/attention_isa.inc"
#endif

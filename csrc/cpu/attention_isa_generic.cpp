// csrc/cpu/attention_isa_generic.cpp — the CPU attention kernel (cpu/attention_kernel.inc) built
// for the compiler's baseline instruction set with 16-byte vectors (SSE2 on x86-64, NEON on Arm).
#define IDDPM_ATTN_ISA isa_generic
#define IDDPM_VB 16
#define IDDPM_MR 6
#include "cpu/attention_isa.inc"

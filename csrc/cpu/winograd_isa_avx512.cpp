// csrc/cpu/winograd_isa_avx512.cpp — the CPU Winograd transforms (cpu/winograd_kernel.inc) built
// with -mavx512{f,bw,vl,dq} -mfma and ATen's CPU_CAPABILITY_AVX512 vectors (CMakeLists.txt sets
// both for this file); csrc/cpu/winograd.cpp calls it only when the CPU has them.
#if defined(__x86_64__)
#define IDDPM_WINO_ISA wino_avx512
#include "cpu/winograd_kernel.inc"
#endif

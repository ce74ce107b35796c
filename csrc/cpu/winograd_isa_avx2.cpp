// csrc/cpu/winograd_isa_avx2.cpp — the CPU Winograd transforms (cpu/winograd_kernel.inc) built
// with -mavx2 -mfma and ATen's CPU_CAPABILITY_AVX2 vectors (CMakeLists.txt sets both for this
// file); csrc/cpu/winograd.cpp calls it only when the CPU has them.
#if defined(__x86_64__)
#define IDDPM_WINO_ISA wino_avx2
#include "cpu/winograd_kernel.inc"
#endif

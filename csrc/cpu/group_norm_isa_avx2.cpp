// csrc/cpu/group_norm_isa_avx2.cpp — the CPU group-norm kernel (cpu/group_norm_kernel.inc) built
// with -mavx2 -mfma -mf16c and ATen's CPU_CAPABILITY_AVX2 vectors (CMakeLists.txt sets both for
// this file); csrc/cpu/group_norm.cpp calls it only when the CPU has avx2 and fma.
#if defined(__x86_64__)
#define IDDPM_GN_ISA gn_avx2
#include "cpu/group_norm_kernel.inc"
#endif

// csrc/cpu/group_norm_isa_avx512.cpp — the CPU group-norm kernel (cpu/group_norm_kernel.inc)
// built with -mavx512{f,bw,vl,dq} -mfma and ATen's CPU_CAPABILITY_AVX512 vectors (CMakeLists.txt
// sets both for this file); csrc/cpu/group_norm.cpp calls it only when the CPU has them.
#if defined(__x86_64__)
#define IDDPM_GN_ISA gn_avx512
#include "cpu/group_norm_kernel.inc"
#endif

// csrc/cpu/group_norm_isa_default.cpp — the CPU group-norm kernel (cpu/group_norm_kernel.inc)
// for the compiler's baseline ISA (CMakeLists.txt defines CPU_CAPABILITY=DEFAULT for this file).
#define IDDPM_GN_ISA gn_default
#include "cpu/group_norm_kernel.inc"

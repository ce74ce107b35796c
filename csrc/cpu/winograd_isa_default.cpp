// csrc/cpu/winograd_isa_default.cpp — the CPU Winograd transforms (cpu/winograd_kernel.inc) for
// the compiler's baseline ISA (CMakeLists.txt defines CPU_CAPABILITY=DEFAULT for this file).
#define IDDPM_WINO_ISA wino_default
#include "cpu/winograd_kernel.inc"

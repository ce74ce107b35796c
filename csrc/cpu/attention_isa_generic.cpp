// csrc/cpu/attention_isa_generic.cpp — the CPU attention kernel (cpu/attention_kernel.inc) built for
// the compiler's baseline instruction set with 16-byte vectors (SSE2 on x86-64, NEON on Arm).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention_isa.h"

// Included after the target pragma so that its static functions are built for this ISA.
#include "common/attention_math.h"

namespace iddpm::cpu::isa_generic {
#define IDDPM_VB 16
#define IDDPM_MR 6
#include "cpu/attention_kernel.inc"
#undef IDDPM_VB
#undef IDDPM_MR
}  // namespace iddpm::cpu::isa_generic

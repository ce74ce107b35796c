// csrc/cpu/attention_isa_avx2.cpp — the CPU attention kernel (cpu/attention_kernel.inc) built for
// avx2 (32-byte vectors); csrc/cpu/attention.cpp calls it only when the CPU has avx2.
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

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// Included after the target pragma so that its static functions are built for this ISA.
#include "common/attention_math.h"

namespace iddpm::cpu::isa_avx2 {
#define IDDPM_VB 32
#define IDDPM_MR 6
#include "cpu/attention_kernel.inc"
#undef IDDPM_VB
#undef IDDPM_MR
}  // namespace iddpm::cpu::isa_avx2
#pragma GCC pop_options
#endif  // __x86_64__

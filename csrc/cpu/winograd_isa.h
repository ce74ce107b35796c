// csrc/cpu/winograd_isa.h — the entry points each vector-ISA build of the CPU Winograd transforms
// (winograd_isa_{default,avx2,avx512}.cpp, all csrc/cpu/winograd_kernel.inc) provides.
#pragma once

#include <cstdint>

#include "common/winograd_params.h"

namespace iddpm::cpu {

#define IDDPM_WINO_DECLARE_ISA(ns)                                                                 \
  namespace ns {                                                                                   \
  void winograd_input(const WinogradInputParams& p);                                               \
  void winograd_output(const WinogradOutputParams& p);                                             \
  void winograd_output_adjoint(const WinogradInputParams& p);                                      \
  void transpose_planes(const void* src, void* dst, DType dtype, int64_t N, int64_t R, int64_t S); \
  void winograd_weight(const WinogradWeightParams& p);                                             \
  }

IDDPM_WINO_DECLARE_ISA(wino_default)
#if defined(__x86_64__)
IDDPM_WINO_DECLARE_ISA(wino_avx2)
IDDPM_WINO_DECLARE_ISA(wino_avx512)
#endif

#undef IDDPM_WINO_DECLARE_ISA

}  // namespace iddpm::cpu

// csrc/cpu/winograd.cpp — picks the vector-ISA build of the CPU Winograd transforms (the weight
// transform's too).
#include "cpu/winograd.h"

#include <cstdint>

#include "cpu/isa_select.h"
#include "cpu/winograd_isa.h"

namespace iddpm::cpu {
namespace {

Isa best_isa() { return select_isa("IDDPM_WINOGRAD_CPU_ISA"); }

}  // namespace

const char* winograd_isa() { return isa_name(best_isa()); }

void winograd_input(const WinogradInputParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return wino_avx512::winograd_input(p);
  if (isa == Isa::kAvx2) return wino_avx2::winograd_input(p);
#endif
  wino_default::winograd_input(p);
}

void winograd_output(const WinogradOutputParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return wino_avx512::winograd_output(p);
  if (isa == Isa::kAvx2) return wino_avx2::winograd_output(p);
#endif
  wino_default::winograd_output(p);
}

void transpose_planes(const void* src, void* dst, DType dtype, int64_t N, int64_t R, int64_t S) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return wino_avx512::transpose_planes(src, dst, dtype, N, R, S);
  if (isa == Isa::kAvx2) return wino_avx2::transpose_planes(src, dst, dtype, N, R, S);
#endif
  wino_default::transpose_planes(src, dst, dtype, N, R, S);
}

void winograd_output_adjoint(const WinogradInputParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return wino_avx512::winograd_output_adjoint(p);
  if (isa == Isa::kAvx2) return wino_avx2::winograd_output_adjoint(p);
#endif
  wino_default::winograd_output_adjoint(p);
}

void winograd_transform_matrix(int64_t tile, double* k) {
  auto fill = [k](const auto& G, int A) {
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < A; ++j)
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) k[(A * i + j) * 9 + 3 * r + s] = G[i][r] * G[j][s];
  };
  if (tile == kWinogradTile4) return fill(kWinogradG4, 6);
  fill(kWinogradG2, 4);
}

void winograd_weight(const WinogradWeightParams& p) {
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return wino_avx512::winograd_weight(p);
  if (isa == Isa::kAvx2) return wino_avx2::winograd_weight(p);
#endif
  wino_default::winograd_weight(p);
}

}  // namespace iddpm::cpu

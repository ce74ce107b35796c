// csrc/cpu/winograd.cpp — picks the vector-ISA build of the CPU Winograd transforms; the weight
// transform (once per weight, not vectorised).
#include "cpu/winograd.h"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

namespace {

// v rounded once (to nearest, ties to even) to bfloat16. Rounding to float first and then to bf16
// could round twice (a sum of up to 9 products of bf16 weights and 0, ±½, ±¼ may need more than
// float's 24 bits); rounding to float toward zero with the last bit set when inexact ("round to
// odd", 24 ≥ 8 + 2 bits) and then to bf16 to nearest gives the correctly rounded result. (The
// float64 sum G g Gᵀ itself is exact unless one filter's weights span more than ~2^45.)
c10::BFloat16 round_to_bf16(double v) {
  float f = static_cast<float>(v);
  if (std::isfinite(f) && static_cast<double>(f) != v) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.f);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= 1u;
    std::memcpy(&f, &bits, sizeof bits);
  }
  return c10::BFloat16(f);  // round to nearest even
}

// G of F(2×2, 3×3) and of F(4×4, 3×3) (common/winograd_params.h), [alpha][3].
constexpr double G2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double G4[6][3] = {{1, 0, 0},
                             {1.0 / 3, 1.0 / 3, 1.0 / 3},
                             {-1.0 / 3, 1.0 / 3, -1.0 / 3},
                             {-16.0 / 15, -8.0 / 15, -4.0 / 15},
                             {1.0 / 15, -2.0 / 15, 4.0 / 15},
                             {0, 0, 1}};

template <class T, int A>
void weight_impl(const double (&G)[A][3], const T* w, int64_t Cout, int64_t Cin,
                 const int64_t stride[4], T* u) {
  const int64_t kstride = Cin * Cout;
  for (int64_t co = 0; co < Cout; ++co) {
    for (int64_t ci = 0; ci < Cin; ++ci) {
      const T* g = w + co * stride[0] + ci * stride[1];
      double gg[3][3];
      for (int r = 0; r < 3; ++r)
        for (int s = 0; s < 3; ++s)
          gg[r][s] = static_cast<double>(g[r * stride[2] + s * stride[3]]);
      double t[A][3];  // G g
      for (int i = 0; i < A; ++i)
        for (int s = 0; s < 3; ++s)
          t[i][s] = G[i][0] * gg[0][s] + G[i][1] * gg[1][s] + G[i][2] * gg[2][s];
      for (int i = 0; i < A; ++i)
        for (int j = 0; j < A; ++j) {
          const double v = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
          if constexpr (std::is_same_v<T, float>) {
            u[(A * i + j) * kstride + ci * Cout + co] = static_cast<float>(v);
          } else {
            u[(A * i + j) * kstride + ci * Cout + co] = round_to_bf16(v);
          }
        }
    }
  }
}

}  // namespace

void winograd_transform_matrix(int64_t tile, double* k) {
  auto fill = [k](const auto& G, int A) {
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < A; ++j)
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) k[(A * i + j) * 9 + 3 * r + s] = G[i][r] * G[j][s];
  };
  if (tile == kWinogradTile4) return fill(G4, 6);
  fill(G2, 4);
}

void winograd_weight(const void* w, DType dtype, int64_t Cout, int64_t Cin, const int64_t stride[4],
                     void* u, int64_t tile) {
  if (tile == kWinogradTile4) {  // float32 only (the op glue's check)
    return weight_impl(G4, static_cast<const float*>(w), Cout, Cin, stride, static_cast<float*>(u));
  }
  if (dtype == DType::kBFloat16) {
    return weight_impl(G2, static_cast<const c10::BFloat16*>(w), Cout, Cin, stride,
                       static_cast<c10::BFloat16*>(u));
  }
  weight_impl(G2, static_cast<const float*>(w), Cout, Cin, stride, static_cast<float*>(u));
}

}  // namespace iddpm::cpu

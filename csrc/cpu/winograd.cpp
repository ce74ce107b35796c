// csrc/cpu/winograd.cpp — picks the vector-ISA build of the CPU Winograd transforms; the weight
// transform (once per weight, not vectorised).
#include "cpu/winograd.h"

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

void winograd_weight(const float* w, int64_t Cout, int64_t Cin, const int64_t stride[4], float* u) {
  // G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  const int64_t kstride = Cin * Cout;
  for (int64_t co = 0; co < Cout; ++co) {
    for (int64_t ci = 0; ci < Cin; ++ci) {
      const float* g = w + co * stride[0] + ci * stride[1];
      double gg[3][3];
      for (int r = 0; r < 3; ++r)
        for (int s = 0; s < 3; ++s) gg[r][s] = g[r * stride[2] + s * stride[3]];
      double t[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int s = 0; s < 3; ++s)
          t[i][s] = G[i][0] * gg[0][s] + G[i][1] * gg[1][s] + G[i][2] * gg[2][s];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const double v = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
          u[(4 * i + j) * kstride + ci * Cout + co] = static_cast<float>(v);
        }
    }
  }
}

}  // namespace iddpm::cpu

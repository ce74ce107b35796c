// csrc/cpu/winograd.cpp — picks the vector-ISA build of the CPU Winograd transforms; the weight
// transform (once per weight, not vectorised).
#include "cpu/winograd.h"

#include <cstdlib>
#include <cstring>

#include "cpu/winograd_isa.h"

namespace iddpm::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa best_isa() {
#if defined(__x86_64__)
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kDefault;
  }();
  Isa isa = hw;
  // A lower ISA can be forced (tests run every build this machine can execute).
  if (const char* env = std::getenv("IDDPM_WINOGRAD_CPU_ISA")) {
    if (std::strcmp(env, "default") == 0) isa = Isa::kDefault;
    if (std::strcmp(env, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
#else
  return Isa::kDefault;
#endif
}

}  // namespace

const char* winograd_isa() {
  switch (best_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

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

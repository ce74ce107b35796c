// csrc/cpu/torch_vml.cpp — see torch_vml.h.
#include "cpu/torch_vml.h"

#include <cmath>

// oneMKL's VML entry points with 64-bit integer arguments (Fortran calling convention: every
// argument by address), as exported by libtorch_cpu where torch links MKL. Weak: null where the
// library has none, and the fallbacks run.
extern "C" {
void VMSEXP_64_(const int64_t* n, const float* a, float* r, const int64_t* mode)
    __attribute__((weak));
void VMSSQRT_64_(const int64_t* n, const float* a, float* r, const int64_t* mode)
    __attribute__((weak));
}

namespace iddpm::cpu::vml {

bool available() { return VMSEXP_64_ != nullptr && VMSSQRT_64_ != nullptr; }

namespace {

// The mode torch passes (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
constexpr int64_t kTorchMode = 0x2 | 0x140000 | 0x100;

using VmlFunction = void (*)(const int64_t*, const float*, float*, const int64_t*);

void apply(VmlFunction vml, float (*fallback)(float), const float* in, float* out, int64_t n) {
  if (n <= 0) return;
  if (available()) {
    vml(&n, in, out, &kTorchMode);
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = fallback(in[i]);
}

}  // namespace

void exp(const float* in, float* out, int64_t n) {
  apply(VMSEXP_64_, [](float a) { return std::exp(a); }, in, out, n);
}

void sqrt(const float* in, float* out, int64_t n) {
  apply(VMSSQRT_64_, [](float a) { return std::sqrt(a); }, in, out, n);
}

}  // namespace iddpm::cpu::vml

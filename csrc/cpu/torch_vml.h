// csrc/cpu/torch_vml.h — float32 exp and sqrt with the bits of torch's own CPU torch.exp and
// torch.sqrt, for the fused step (csrc/cpu/step*.cpp) to give the eager path's results.
//
// Torch's x86-64 builds link oneMKL and evaluate float32 torch.exp / torch.sqrt on the CPU with
// MKL's vector math library (VML, high-accuracy mode, denormals kept), whatever the tensor's
// size. Those results are not always correctly rounded (about 1% of exp and 0.6% of sqrt values
// are one ulp from the correctly rounded value), so neither std::exp nor SLEEF reproduces them.
// libtorch_cpu exports VML's 64-bit-integer entry points; these functions call them when present
// and fall back to std::exp / std::sqrt otherwise (torch builds without MKL).
#pragma once

#include <cstdint>

namespace iddpm::cpu::vml {

// True where torch's VML functions were found (the results below are then torch's bits).
bool available();

// out[i] = exp(in[i]) / sqrt(in[i]) for i in [0, n); in == out is allowed.
void exp(const float* in, float* out, int64_t n);
void sqrt(const float* in, float* out, int64_t n);

inline float exp(float a) {
  float r;
  exp(&a, &r, 1);
  return r;
}
inline float sqrt(float a) {
  float r;
  sqrt(&a, &r, 1);
  return r;
}

}  // namespace iddpm::cpu::vml

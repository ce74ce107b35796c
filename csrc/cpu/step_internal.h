// csrc/cpu/step_internal.h — what the two CPU translation units of the fused step share:
// csrc/cpu/step.cpp (baseline ISA: argument preparation, the scalar kernel, Philox) and
// csrc/cpu/step_avx2.cpp (the at::vec kernel compiled for AVX2).
#pragma once

#include <cstdint>

#include "common/step_math.h"
#include "common/step_params.h"
#include "cpu/torch_vml.h"

namespace iddpm::cpu::detail {

// common/step_math.h's scalar arithmetic with torch's own float32 exp and sqrt, so that the
// per-item factors (and the scalar kernel's elements) are those of the eager path's torch ops.
struct TorchScalarOps : step::ScalarOps {
  static float exp(float a) { return vml::exp(a); }
  static float sqrt(float a) { return vml::sqrt(a); }
};

// Philox normals of Philox elements [first, first + n) (common/step_params.h
// noise_element) into out[0, n).
void step_philox_fill(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, float* out);

// The whole step with at::vec on AVX2 (coefs: [B] per-item quantities, t already
// validated). Returns false, doing nothing, where this build has no AVX2 kernel.
bool step_avx2(const step::StepParams& p, const step::ItemCoefs* coefs);

}  // namespace iddpm::cpu::detail

// csrc/cpu/step.h — CPU kernel of the fused reverse-diffusion steps (iddpm::p_sample_step,
// ddim_step, ddim_reverse_step) over raw pointers (no tensor types here).
#pragma once

#include <cstdint>

#include "common/step_params.h"

namespace iddpm::cpu {

// The fused reverse-diffusion step (common/step_params.h describes the arguments).
// Returns -1, or the first b whose t[b] is outside [0, T) (then nothing is written).
int64_t step(const step::StepParams& params);

}  // namespace iddpm::cpu

// csrc/cuda/step.h — CUDA launcher of the fused reverse-diffusion steps (iddpm::p_sample_step,
// ddim_step, ddim_reverse_step) over raw pointers and a stream. Plain C++ (no torch, no CUDA
// headers) so the glue in csrc/ops can include it.
#pragma once

#include <cstdint>

#include "common/step_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace iddpm::cuda {

// The fused reverse-diffusion step (common/step_params.h), one kernel launch on `stream`.
// Items whose t is outside [0, T) get NaN outputs (no host sync to raise).
// Returns a cudaError_t value (0 = success) of the launch.
int step(const step::StepParams& params, cudaStream_t stream);

}  // namespace iddpm::cuda

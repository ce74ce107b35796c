// csrc/common/step_params.h — the plain argument block of the fused reverse-diffusion step
// kernels (iddpm::p_sample_step, ddim_step, ddim_reverse_step) and the per-sample noise
// indexing. No torch and no CUDA types: the glue in csrc/ops fills it, csrc/cpu and
// csrc/cuda read it.
//
// Layout. Every per-element tensor is dense in one of two memory orders:
//   channels-first: x, noise, outputs [B, C, S] (S = product of spatial sizes),
//                   model_output [B, Cm, S]
//   channels-last:  x, noise, outputs [B, S, C], model_output [B, S, Cm]
// with Cm = 2C when the model also predicts variances (mean channels first), else C.
// The element index i runs over x's memory order. In-kernel noise is keyed by the element's
// place in its *sample's* stream: element e (memory order within item b, 0 <= e < C*S) of
// global sample n_b = sample_index[b] (b when sample_index is null) takes Philox element
// n_b * C*S + e (noise_element below), so a sample's noise does not depend on the batch.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace iddpm::step {

// The dtypes of x, noise, the outputs and model_output (the glue checks them against this list).
inline constexpr DType kStepDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// The update rule (one op each).
enum Rule : int32_t { kAncestral = 0, kDdim = 1, kDdimReverse = 2 };

// What the model predicts (improved-diffusion's ModelMeanType).
enum MeanType : int32_t { kPreviousX = 0, kStartX = 1, kEpsilon = 2 };

// The reverse-process variance (improved-diffusion's ModelVarType).
enum VarType : int32_t { kLearned = 0, kFixedSmall = 1, kFixedLarge = 2, kLearnedRange = 3 };

enum NoiseMode : int32_t {
  kNoNoise = 0,        // the rule needs none (DDIM with eta = 0, reverse DDIM)
  kExplicitNoise = 1,  // read from `noise`
  kPhiloxNoise = 2,    // drawn in the kernel (common/philox.h)
};

// Where the Philox seed and offset come from. Outside CUDA graph capture the values are
// known on the host; inside capture they live in device memory that torch refills
// before every replay (torch's PhiloxCudaState, copied field by field).
struct PhiloxSource {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;    // captured: seed = *seed_ptr
  const int64_t* offset_ptr = nullptr;  // captured: offset = *offset_ptr + offset_intragraph
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

struct StepConfig {
  int32_t rule = kAncestral;
  int32_t mean_type = kEpsilon;
  int32_t var_type = kFixedSmall;
  bool clip = true;
  float eta = 0.0f;  // DDIM only
};

struct StepParams {
  int64_t B = 0, C = 0, S = 0;
  bool learned = false;        // model_output has 2C channels
  bool channels_last = false;  // memory order (b, s, c) instead of (b, c, s)
  const void* x = nullptr;     // [B, C, S] x_dtype
  DType x_dtype = DType::kFloat32;
  const void* model_output = nullptr;  // [B, Cm, S] mo_dtype
  DType mo_dtype = DType::kFloat32;
  const void* noise = nullptr;  // [B, C, S] x_dtype, kExplicitNoise only
  void* out = nullptr;          // [B, C, S] x_dtype: x_{t-1} (x_{t+1} for reverse DDIM)
  void* pred_xstart = nullptr;  // [B, C, S] x_dtype, or nullptr when not wanted
  const void* t = nullptr;      // [B] int64 or int32 timesteps
  bool t_is_int64 = true;
  const void* sample_index = nullptr;  // [B] int64 or int32 global sample indices, or nullptr
  bool sample_index_is_int64 = true;
  const float* table = nullptr;  // [T, K] float32 coefficient table (iddpm_ext/core/tables.py)
  int64_t T = 0, K = 0;
  StepConfig cfg;
  int32_t noise_mode = kNoNoise;
  PhiloxSource philox;
};

// The global sample index of batch item b (keys its in-kernel noise; see the top).
IDDPM_HD uint64_t noise_sample(const StepParams& p, int64_t b) {
  if (p.sample_index == nullptr) return static_cast<uint64_t>(b);
  const int64_t n = p.sample_index_is_int64
                        ? static_cast<const int64_t*>(p.sample_index)[b]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.sample_index)[b]);
  return static_cast<uint64_t>(n);  // any int64: negative values wrap modulo 2^64
}

// The Philox element index of element e (memory order within its sample) of global sample
// `sample` with `per_sample` = C*S elements: the samples' streams are consecutive runs of
// one element sequence, so sample_index = arange(B) is the plain element index b*C*S + e.
IDDPM_HD uint64_t noise_element(uint64_t sample, int64_t per_sample, int64_t e) {
  return sample * static_cast<uint64_t>(per_sample) + static_cast<uint64_t>(e);
}

}  // namespace iddpm::step

// csrc/common/step_math.h — per-element math of the fused reverse-diffusion steps, shared
// by csrc/cpu/step.cpp (V = float), csrc/cpu/step_avx2.cpp (V = at::vec::Vectorized<float>)
// and csrc/cuda/step.cu (V = float).
//
// Every formula repeats the eager path of iddpm_ext/gaussian_diffusion.py operation by
// operation (same operands, same order, each product and sum rounded to float32 on its own),
// so the fused result equals the eager one up to the last bits of exp() and sqrt() (on the
// CPU, with torch's own exp and sqrt, exactly; see `M` below):
//   pred_x0  ε: sqrt_recip_ac·x − sqrt_recipm1_ac·ε    x_prev: rc1·x_prev − (c2/c1)·x
//            x0: model output; then clamp to [−1, 1] when clip_denoised
//   ancestral: mean = coef1·x0 + coef2·x (model output itself for x_prev)
//              log σ² = v (learned), frac·log β + (1−frac)·log β̃ with frac = (v+1)/2
//              (learned range), or the table's fixed value; x_{t-1} = mean + (mask·σ)·z
//   DDIM:      ε = (sqrt_recip_ac·x − x0)/sqrt_recipm1_ac,
//              σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ))·sqrt(1−ᾱ/ᾱ_prev),
//              x_{t-1} = x0·sqrt(ᾱ_prev) + sqrt(1−ᾱ_prev−σ²)·ε + (mask·σ)·z
//   reverse:   x_{t+1} = x0·sqrt(ᾱ_next) + sqrt(1−ᾱ_next)·ε
// with mask = 0 where t = 0 (no noise in the last step). The per-item DDIM factors (σ and the
// square roots) are computed in float32 in the reference's order of operations, like the rest.
//
// `M` supplies the arithmetic: M::mul/add/sub/div round each operation separately
// (on CUDA through __fmul_rn etc., so nvcc does not contract them into FMAs); M::exp and
// M::sqrt are the device's, or on the CPU torch's own (csrc/cpu/torch_vml.h), which makes the
// fused CPU step the eager one bit for bit where torch evaluates them with oneMKL.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/step_params.h"

// The per-element functions below are always inlined: on the CPU they run on
// at::vec::Vectorized<float> values, which are expensive to pass by value to a call.
#if defined(__CUDACC__)
#define IDDPM_STEP_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define IDDPM_STEP_INLINE inline __attribute__((always_inline))
#else
#define IDDPM_STEP_INLINE inline
#endif

namespace iddpm::step {

// Columns of the coefficient table read by the step kernels: positions in
// iddpm_ext/core/tables.py COEF_NAMES (tests/ops/test_step.py checks they agree).
namespace col {
constexpr int kPosteriorLogVarianceClipped = 6;
constexpr int kPosteriorMeanCoef1 = 7;
constexpr int kPosteriorMeanCoef2 = 8;
constexpr int kSqrtRecipAlphasCumprod = 3;
constexpr int kSqrtRecipm1AlphasCumprod = 4;
constexpr int kLogBetas = 9;
constexpr int kFixedLargeLogVariance = 11;
constexpr int kAlphasCumprod = 12;
constexpr int kAlphasCumprodPrev = 13;
constexpr int kAlphasCumprodNext = 14;
constexpr int kRecipPosteriorMeanCoef1 = 16;
constexpr int kPosteriorMeanCoef2OverCoef1 = 17;
constexpr int kMinColumns = 18;  // highest column read + 1
}  // namespace col

// Scalar float arithmetic without contraction (host and device).
struct ScalarOps {
  using V = float;
  static IDDPM_HD float splat(float a) { return a; }
#if defined(__CUDA_ARCH__)
  static IDDPM_HD float mul(float a, float b) { return __fmul_rn(a, b); }
  static IDDPM_HD float add(float a, float b) { return __fadd_rn(a, b); }
  static IDDPM_HD float sub(float a, float b) { return __fsub_rn(a, b); }
  static IDDPM_HD float div(float a, float b) { return __fdiv_rn(a, b); }
  static IDDPM_HD float sqrt(float a) { return __fsqrt_rn(a); }
  static IDDPM_HD float exp(float a) { return expf(a); }
#else
  static IDDPM_HD float mul(float a, float b) { return a * b; }
  static IDDPM_HD float add(float a, float b) { return a + b; }
  static IDDPM_HD float sub(float a, float b) { return a - b; }
  static IDDPM_HD float div(float a, float b) { return a / b; }
  static IDDPM_HD float sqrt(float a) { return std::sqrt(a); }
  static IDDPM_HD float exp(float a) { return std::exp(a); }
#endif
  // torch.clamp(v, -1, 1): NaN stays NaN. Written as two selects whose false branch is v, so
  // that x86 compilers emit maxss/minss (no data-dependent branches).
  static IDDPM_HD float clamp_unit(float v) {
    const float lo = -1.0f > v ? -1.0f : v;
    return 1.0f < lo ? 1.0f : lo;
  }
};

// The per-item quantities of one step, computed once per batch item from its table row.
struct ItemCoefs {
  float sr, srm1;     // sqrt(1/ᾱ), sqrt(1/ᾱ − 1)
  float rc1, c2oc1;   // 1/coef1, coef2/coef1 (x_prev mean type)
  float c1, c2;       // posterior mean coefficients
  float min_log;      // log β̃ (clipped), learned range
  float max_log;      // log β, learned range
  float mask;         // 1 where t != 0, else 0
  float noise_scale;  // ancestral, fixed variance: mask·exp(0.5·log σ²); DDIM: mask·σ
  float ddim_a;       // DDIM: sqrt(ᾱ_prev); reverse: sqrt(ᾱ_next)
  float ddim_b;       // DDIM: sqrt(1 − ᾱ_prev − σ²); reverse: sqrt(1 − ᾱ_next)
};

// row: the K coefficients of timestep tt (tt already known to be in range). M: scalar
// arithmetic as ScalarOps (the CPU passes one with torch's exp and sqrt).
template <class M = ScalarOps>
IDDPM_HD ItemCoefs item_coefs(const float* row, int64_t tt, const StepConfig& cfg) {
  ItemCoefs c;
  c.sr = row[col::kSqrtRecipAlphasCumprod];
  c.srm1 = row[col::kSqrtRecipm1AlphasCumprod];
  c.rc1 = row[col::kRecipPosteriorMeanCoef1];
  c.c2oc1 = row[col::kPosteriorMeanCoef2OverCoef1];
  c.c1 = row[col::kPosteriorMeanCoef1];
  c.c2 = row[col::kPosteriorMeanCoef2];
  c.min_log = row[col::kPosteriorLogVarianceClipped];
  c.max_log = row[col::kLogBetas];
  c.mask = tt != 0 ? 1.0f : 0.0f;
  c.noise_scale = 0.0f;
  c.ddim_a = 0.0f;
  c.ddim_b = 0.0f;
  if (cfg.rule == kAncestral) {
    if (cfg.var_type == kFixedSmall || cfg.var_type == kFixedLarge) {
      const float log_var = cfg.var_type == kFixedSmall ? row[col::kPosteriorLogVarianceClipped]
                                                        : row[col::kFixedLargeLogVariance];
      c.noise_scale = M::mul(c.mask, M::exp(M::mul(0.5f, log_var)));
    }
  } else if (cfg.rule == kDdim) {
    // In float32, in the reference's order of operations (ddim_sample), so the step is its
    // step bit for bit: σ = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_prev),
    // b = sqrt((1 − ᾱ_prev) − σ²). Where rounding makes (1 − ᾱ_prev) − σ² negative (η near 1),
    // the reference's sqrt gives NaN; 0 here.
    const float ab = row[col::kAlphasCumprod];
    const float abp = row[col::kAlphasCumprodPrev];
    const float sigma =
        M::mul(M::mul(cfg.eta, M::sqrt(M::div(M::sub(1.0f, abp), M::sub(1.0f, ab)))),
               M::sqrt(M::sub(1.0f, M::div(ab, abp))));
    const float rest = M::sub(M::sub(1.0f, abp), M::mul(sigma, sigma));
    c.ddim_a = M::sqrt(abp);
    c.ddim_b = M::sqrt(rest > 0.0f ? rest : 0.0f);
    c.noise_scale = M::mul(c.mask, sigma);
  } else {  // kDdimReverse, as the reference's ddim_reverse_sample, in float32
    const float abn = row[col::kAlphasCumprodNext];
    c.ddim_a = M::sqrt(abn);
    c.ddim_b = M::sqrt(M::sub(1.0f, abn));
  }
  return c;
}

// x0 predicted from x_t and the model's mean output, clipped when asked.
template <class M, class V>
IDDPM_STEP_INLINE V pred_xstart(const StepConfig& cfg, const ItemCoefs& c, V x, V mo) {
  V x0;
  if (cfg.mean_type == kEpsilon) {
    x0 = M::sub(M::mul(M::splat(c.sr), x), M::mul(M::splat(c.srm1), mo));
  } else if (cfg.mean_type == kStartX) {
    x0 = mo;
  } else {  // kPreviousX
    x0 = M::sub(M::mul(M::splat(c.rc1), mo), M::mul(M::splat(c.c2oc1), x));
  }
  return cfg.clip ? M::clamp_unit(x0) : x0;
}

// Learned variance types: 0.5·log σ² from the model's variance output v, whose exp is σ.
template <class M, class V>
IDDPM_STEP_INLINE V learned_half_log_variance(const StepConfig& cfg, const ItemCoefs& c, V v) {
  if (cfg.var_type == kLearnedRange) {
    const V frac = M::div(M::add(v, M::splat(1.0f)), M::splat(2.0f));
    const V log_var = M::add(M::mul(frac, M::splat(c.max_log)),
                             M::mul(M::sub(M::splat(1.0f), frac), M::splat(c.min_log)));
    return M::mul(M::splat(0.5f), log_var);
  }
  return M::mul(M::splat(0.5f), v);  // kLearned: v is log σ²
}

// The factor that multiplies the noise in an ancestral step: mask·exp(0.5·log σ²).
// kSigmaGiven: for the learned types v already holds σ = exp(learned_half_log_variance(v))
// (the CPU kernel evaluates those exps a chunk at a time with torch's exp).
template <class M, bool kSigmaGiven, class V>
IDDPM_STEP_INLINE V ancestral_noise_scale(const StepConfig& cfg, const ItemCoefs& c, V v) {
  if (cfg.var_type == kLearned || cfg.var_type == kLearnedRange) {
    const V sigma = kSigmaGiven ? v : M::exp(learned_half_log_variance<M>(cfg, c, v));
    return M::mul(M::splat(c.mask), sigma);
  }
  return M::splat(c.noise_scale);
}

// One element of a step. x: x_t; mo: model output (mean channel); v: its variance
// channel (learned types; σ itself when kSigmaGiven); z: N(0, 1) noise (ignored when
// has_noise is false). Returns the new sample; *x0_out receives pred_x0.
template <class M, bool kSigmaGiven = false, class V>
IDDPM_STEP_INLINE V step_element(const StepConfig& cfg, const ItemCoefs& c, V x, V mo, V v, V z,
                                 bool has_noise, V* x0_out) {
  const V x0 = pred_xstart<M>(cfg, c, x, mo);
  *x0_out = x0;
  if (cfg.rule == kAncestral) {
    const V mean = cfg.mean_type == kPreviousX
                       ? mo
                       : M::add(M::mul(M::splat(c.c1), x0), M::mul(M::splat(c.c2), x));
    return M::add(mean, M::mul(ancestral_noise_scale<M, kSigmaGiven>(cfg, c, v), z));
  }
  // DDIM (either direction): ε re-derived from the clipped x0.
  const V eps = M::div(M::sub(M::mul(M::splat(c.sr), x), x0), M::splat(c.srm1));
  const V mean = M::add(M::mul(x0, M::splat(c.ddim_a)), M::mul(M::splat(c.ddim_b), eps));
  if (cfg.rule == kDdim && has_noise) {
    return M::add(mean, M::mul(M::splat(c.noise_scale), z));
  }
  return mean;
}

}  // namespace iddpm::step

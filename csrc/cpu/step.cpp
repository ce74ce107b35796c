// csrc/cpu/step.cpp — CPU entry of the fused reverse-diffusion steps (iddpm::p_sample_step,
// ddim_step, ddim_reverse_step): validates t, computes each item's coefficients once, then
// runs the at::vec kernel of csrc/cpu/step_avx2.cpp when torch's CPU capability is AVX2 or
// better (ATEN_CPU_CAPABILITY=default forces the other path), else the portable scalar
// kernel below. Both evaluate common/step_math.h; every element is read once and written once.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/philox.h"
#include "common/step_math.h"
#include "cpu/step.h"
#include "cpu/step_internal.h"

namespace iddpm::cpu {

namespace detail {

void step_philox_fill(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, float* out) {
  int64_t i = 0;
  while (i < n) {
    const uint64_t e = first + static_cast<uint64_t>(i);
    const uint64_t group = e / 4;
    float z[4];
    philox::normal4(seed, offset, group, z);
    for (uint64_t r = e - group * 4; r < 4 && i < n; ++r, ++i) out[i] = z[r];
  }
}

}  // namespace detail

namespace {

using step::ItemCoefs;
using step::StepParams;

// The portable kernel (any x86-64 or other CPU): scalar float math, one element at a time,
// in units of (item, chunk of kChunk elements) as the at::vec kernel; exp by torch's own
// (one call per element: this path is the fallback for CPUs without AVX2).
template <typename xT, typename moT>
void run_scalar(const StepParams& p, const std::vector<ItemCoefs>& coefs) {
  constexpr int64_t kChunk = 1024;  // a multiple of 4
  const int64_t L = p.C * p.S;
  const int64_t Cm = p.learned ? 2 * p.C : p.C;
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  const bool need_var = p.learned && p.cfg.rule == step::kAncestral &&
                        (p.cfg.var_type == step::kLearned || p.cfg.var_type == step::kLearnedRange);
  const bool has_noise = p.noise_mode != step::kNoNoise;
  at::parallel_for(0, p.B * chunks, 32, [&](int64_t begin, int64_t end) {
    float z[kChunk];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / chunks;
      const int64_t j0 = (u - b * chunks) * kChunk;
      const int64_t n = std::min(kChunk, L - j0);
      const int64_t base = b * L + j0;
      const auto* x = static_cast<const xT*>(p.x) + base;
      const auto* mo_item = static_cast<const moT*>(p.model_output) + b * Cm * p.S;
      const auto* noise = static_cast<const xT*>(p.noise) + base;
      auto* out = static_cast<xT*>(p.out) + base;
      auto* pred = p.pred_xstart ? static_cast<xT*>(p.pred_xstart) + base : nullptr;
      if (p.noise_mode == step::kPhiloxNoise) {
        detail::step_philox_fill(p.philox.seed, p.philox.offset,
                                 step::noise_element(step::noise_sample(p, b), L, j0), n, z);
      }
      // Model output offset of element j0 and the distance to its variance channel.
      const bool interleaved = p.learned && p.channels_last;  // [B, S, 2C]
      int64_t s = interleaved ? j0 / p.C : 0, c = interleaved ? j0 - s * p.C : 0;
      const int64_t var_delta = interleaved ? p.C : L;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t mo_off = interleaved ? s * Cm + c : j0 + k;
        if (interleaved && ++c == p.C) c = 0, ++s;
        const float v = need_var ? static_cast<float>(mo_item[mo_off + var_delta]) : 0.0f;
        const float zi = p.noise_mode == step::kExplicitNoise ? static_cast<float>(noise[k])
                                                              : (has_noise ? z[k] : 0.0f);
        float x0;
        const float sample = step::step_element<detail::TorchScalarOps>(
            p.cfg, coefs[b], static_cast<float>(x[k]), static_cast<float>(mo_item[mo_off]), v, zi,
            has_noise, &x0);
        out[k] = static_cast<xT>(sample);
        if (pred != nullptr) pred[k] = static_cast<xT>(x0);
      }
    }
  });
}

template <typename xT>
void run_scalar_mo(const StepParams& p, const std::vector<ItemCoefs>& coefs) {
  switch (p.mo_dtype) {
    case DType::kFloat32: return run_scalar<xT, float>(p, coefs);
    case DType::kFloat16: return run_scalar<xT, c10::Half>(p, coefs);
    case DType::kBFloat16: return run_scalar<xT, c10::BFloat16>(p, coefs);
    case DType::kFloat64: return;  // not a step dtype (the glue checks kStepDtypes)
  }
}

template <typename index_t>
int64_t item_coefs_or_bad(const StepParams& p, std::vector<ItemCoefs>* coefs) {
  const auto* t = static_cast<const index_t*>(p.t);
  for (int64_t b = 0; b < p.B; ++b) {
    if (t[b] < 0 || static_cast<int64_t>(t[b]) >= p.T) return b;
  }
  coefs->resize(p.B);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t tt = static_cast<int64_t>(t[b]);
    (*coefs)[b] = step::item_coefs<detail::TorchScalarOps>(p.table + tt * p.K, tt, p.cfg);
  }
  return -1;
}

bool use_vector_kernel() {
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
}

}  // namespace

int64_t step(const step::StepParams& p) {
  std::vector<ItemCoefs> coefs;
  const int64_t bad =
      p.t_is_int64 ? item_coefs_or_bad<int64_t>(p, &coefs) : item_coefs_or_bad<int32_t>(p, &coefs);
  if (bad >= 0) return bad;
  if (p.B * p.C * p.S == 0) return -1;
  if (use_vector_kernel() && detail::step_avx2(p, coefs.data())) return -1;
  switch (p.x_dtype) {
    case DType::kFloat32: run_scalar_mo<float>(p, coefs); break;
    case DType::kFloat16: run_scalar_mo<c10::Half>(p, coefs); break;
    case DType::kBFloat16: run_scalar_mo<c10::BFloat16>(p, coefs); break;
    case DType::kFloat64: break;  // not a step dtype (the glue checks kStepDtypes)
  }
  return -1;
}

}  // namespace iddpm::cpu

// csrc/cpu/step.cpp — CPU kernel of the fused reverse-diffusion steps
// (iddpm::p_sample_step, ddim_step, ddim_reverse_step).
//
// Work is split into units of (batch item, chunk of up to kChunk elements of that item
// in memory order) and spread over threads with at::parallel_for. Each unit converts its
// inputs to float32 (or reads float32 inputs in place), runs the shared per-element math
// of common/step_math.h on at::vec::Vectorized<float>, and converts the results to the
// output dtype. Every element is read once and written once.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // (its `#pragma unroll` lines warn under g++: harmless)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/philox.h"
#include "common/step_math.h"
#include "cpu/kernels.h"

namespace iddpm::cpu {
namespace {

using step::ItemCoefs;
using step::StepConfig;
using step::StepParams;
using Vec = at::vec::Vectorized<float>;

// The arithmetic of common/step_math.h on vectors of floats (element-wise, IEEE).
struct VecOps {
  using V = Vec;
  static V splat(float a) { return Vec(a); }
  static V mul(const V& a, const V& b) { return a * b; }
  static V add(const V& a, const V& b) { return a + b; }
  static V sub(const V& a, const V& b) { return a - b; }
  static V div(const V& a, const V& b) { return a / b; }
  static V exp(const V& a) { return a.exp(); }
  static V clamp_unit(const V& a) { return at::vec::clamp(a, Vec(-1.0f), Vec(1.0f)); }
};

constexpr int64_t kChunk = 1024;  // elements per unit; a multiple of Vec::size() and of 4

template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
void store_from_float(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Philox normals for elements [first, first + n) of the whole tensor (memory order).
void philox_fill(uint64_t seed, uint64_t offset, int64_t first, int64_t n, float* out) {
  int64_t i = 0;
  while (i < n) {
    const int64_t e = first + i;
    const int64_t group = e / 4;
    float z[4];
    philox::normal4(seed, offset, static_cast<uint64_t>(group), z);
    for (int64_t r = e - group * 4; r < 4 && i < n; ++r, ++i) out[i] = z[r];
  }
}

template <typename xT, typename moT>
class StepKernel {
 public:
  explicit StepKernel(const StepParams& p, const std::vector<ItemCoefs>& coefs)
      : p_(p), coefs_(coefs) {}

  // One unit: item b, elements [j0, j0 + n) of its C*S elements in memory order.
  void run_unit(int64_t b, int64_t j0, int64_t n) const {
    const int64_t L = p_.C * p_.S;
    const int64_t Cm = p_.learned ? 2 * p_.C : p_.C;
    const int64_t base = b * L + j0;  // first element (x's memory order)
    const auto* x = static_cast<const xT*>(p_.x) + base;
    const auto* mo_item = static_cast<const moT*>(p_.model_output) + b * Cm * p_.S;
    const bool need_var = p_.learned && p_.cfg.rule == step::kAncestral &&
                          (p_.cfg.var_type == step::kLearned ||
                           p_.cfg.var_type == step::kLearnedRange);

    alignas(64) float xbuf[kChunk], mbuf[kChunk], vbuf[kChunk], zbuf[kChunk];
    alignas(64) float obuf[kChunk], pbuf[kChunk];
    const float* xs = as_float(x, n, xbuf);
    const float* ms;
    const float* vs = vbuf;
    if (!p_.learned || !p_.channels_last) {
      // The mean channels are contiguous, the variance channels C*S elements later.
      ms = as_float(mo_item + j0, n, mbuf);
      if (need_var) vs = as_float(mo_item + j0 + p_.C * p_.S, n, vbuf);
    } else {
      // channels-last with 2C channels: position s holds C means then C variances.
      int64_t s = j0 / p_.C, c = j0 - s * p_.C;
      for (int64_t i = 0; i < n; ++i) {
        const moT* at_s = mo_item + s * Cm;
        mbuf[i] = static_cast<float>(at_s[c]);
        if (need_var) vbuf[i] = static_cast<float>(at_s[p_.C + c]);
        if (++c == p_.C) c = 0, ++s;
      }
      ms = mbuf;
    }
    const float* zs = zbuf;
    const bool has_noise = p_.noise_mode != step::kNoNoise;
    if (p_.noise_mode == step::kExplicitNoise) {
      zs = as_float(static_cast<const xT*>(p_.noise) + base, n, zbuf);
    } else if (p_.noise_mode == step::kPhiloxNoise) {
      philox_fill(p_.philox.seed, p_.philox.offset, base, n, zbuf);
    }

    xT* out = static_cast<xT*>(p_.out) + base;
    xT* pred = p_.pred_xstart ? static_cast<xT*>(p_.pred_xstart) + base : nullptr;
    float* os = std::is_same_v<xT, float> ? reinterpret_cast<float*>(out) : obuf;
    float* ps = (pred && std::is_same_v<xT, float>) ? reinterpret_cast<float*>(pred) : pbuf;

    const ItemCoefs& c = coefs_[b];
    const StepConfig& cfg = p_.cfg;
    const Vec zero(0.0f);
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
      const bool full = cnt == Vec::size();
      const Vec xv = full ? Vec::loadu(xs + i) : Vec::loadu(xs + i, cnt);
      const Vec mv = full ? Vec::loadu(ms + i) : Vec::loadu(ms + i, cnt);
      const Vec vv = !need_var ? zero : (full ? Vec::loadu(vs + i) : Vec::loadu(vs + i, cnt));
      const Vec zv = !has_noise ? zero : (full ? Vec::loadu(zs + i) : Vec::loadu(zs + i, cnt));
      Vec x0;
      const Vec sample = step::step_element<VecOps>(cfg, c, xv, mv, vv, zv, has_noise, &x0);
      sample.store(os + i, cnt);
      if (pred) x0.store(ps + i, cnt);
    }
    if constexpr (!std::is_same_v<xT, float>) {
      store_from_float(os, n, out);
      if (pred) store_from_float(ps, n, pred);
    }
  }

 private:
  const StepParams& p_;
  const std::vector<ItemCoefs>& coefs_;
};

template <typename index_t>
int64_t item_coefs_or_bad(const StepParams& p, std::vector<ItemCoefs>* coefs) {
  const auto* t = static_cast<const index_t*>(p.t);
  for (int64_t b = 0; b < p.B; ++b) {
    if (t[b] < 0 || static_cast<int64_t>(t[b]) >= p.T) return b;
  }
  coefs->resize(p.B);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t tt = static_cast<int64_t>(t[b]);
    (*coefs)[b] = step::item_coefs(p.table + tt * p.K, tt, p.cfg);
  }
  return -1;
}

template <typename xT, typename moT>
void run_all(const StepParams& p, const std::vector<ItemCoefs>& coefs) {
  const int64_t L = p.C * p.S;
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  const StepKernel<xT, moT> kernel(p, coefs);
  // About 32K elements per task: small steps stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / kChunk);
  at::parallel_for(0, p.B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / chunks;
      const int64_t j0 = (u - b * chunks) * kChunk;
      kernel.run_unit(b, j0, std::min(kChunk, L - j0));
    }
  });
}

template <typename xT>
void dispatch_mo(const StepParams& p, const std::vector<ItemCoefs>& coefs) {
  switch (p.mo_dtype) {
    case step::DType::kFloat32: return run_all<xT, float>(p, coefs);
    case step::DType::kFloat16: return run_all<xT, c10::Half>(p, coefs);
    case step::DType::kBFloat16: return run_all<xT, c10::BFloat16>(p, coefs);
  }
}

}  // namespace

int64_t step(const step::StepParams& p) {
  std::vector<ItemCoefs> coefs;
  const int64_t bad = p.t_is_int64 ? item_coefs_or_bad<int64_t>(p, &coefs)
                                   : item_coefs_or_bad<int32_t>(p, &coefs);
  if (bad >= 0) return bad;
  if (p.B * p.C * p.S == 0) return -1;
  switch (p.x_dtype) {
    case step::DType::kFloat32: dispatch_mo<float>(p, coefs); break;
    case step::DType::kFloat16: dispatch_mo<c10::Half>(p, coefs); break;
    case step::DType::kBFloat16: dispatch_mo<c10::BFloat16>(p, coefs); break;
  }
  return -1;
}

}  // namespace iddpm::cpu

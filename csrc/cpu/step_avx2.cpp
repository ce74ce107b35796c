// csrc/cpu/step_avx2.cpp — the at::vec kernel of the fused reverse-diffusion steps.
//
// This file is compiled for AVX2 (+F16C, no FMA: every product and sum rounds on its own,
// as in the eager path) with at::vec's AVX2 implementation (CPU_CAPABILITY_AVX2), whatever
// the flags of the rest of the build; csrc/cpu/step.cpp calls it only when torch's CPU
// capability is AVX2 or AVX512. Everything defined here after the target pragma is used
// only here (templates over this file's types), so no AVX2 code leaks into baseline paths.
//
// Work is split into units of (batch item, chunk of up to kChunk elements of that item in
// memory order) spread over threads with at::parallel_for. A unit converts its inputs to
// float32 buffers (float32 inputs are read in place), evaluates common/step_math.h on
// Vectorized<float>, and converts the results to x's dtype. A learned variance's σ = exp(·) is
// evaluated a chunk at a time with torch's own exp (csrc/cpu/torch_vml.h; SLEEF's where torch
// has no MKL), so the step has the eager path's bits.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/philox.h"  // before the target pragma: its inline functions stay baseline
#include "cpu/torch_vml.h"  // (the same)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY)
#define IDDPM_STEP_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
// g++ does not define the ISA macros for a target pragma in C++; sleef.h (declarations
// of the AVX2 SLEEF functions that torch exports) and at::vec test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// (Under g++ its `#pragma unroll` lines warn, and the static invokers of a few lambdas in
// vec256_bfloat16.h miss the target pragma (-Wpsabi); this file does not use them.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include "cpu/step_internal.h"

namespace iddpm::cpu::detail {
namespace {

using step::ItemCoefs;
using step::StepConfig;
using step::StepParams;
using Vec = at::vec::Vectorized<float>;

// The arithmetic of common/step_math.h on 8 floats at a time (element-wise, IEEE).
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

constexpr int64_t kChunk = 1024;  // elements per unit: a multiple of Vec::size() and of 4

// common/philox.h for 8 element groups (32 elements) at a time: the integer rounds as
// plain loops the compiler vectorizes, Box–Muller with SLEEF's log/sin/cos; the same
// numbers as step_philox_fill up to the last bits of the transcendental functions.
void philox_fill_vec(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, float* out) {
  constexpr int kGroups = Vec::size();
  constexpr uint64_t kRun = 4 * kGroups;
  int64_t i = std::min<int64_t>(n, static_cast<int64_t>((kRun - first % kRun) % kRun));
  if (i > 0) step_philox_fill(seed, offset, first, i, out);  // up to a multiple of 32
  const uint64_t step = offset / 4;
  for (; i + 4 * kGroups <= n; i += 4 * kGroups) {
    const uint64_t g0 = (first + static_cast<uint64_t>(i)) / 4;
    uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int l = 0; l < kGroups; ++l) {
      c0[l] = static_cast<uint32_t>(step);
      c1[l] = static_cast<uint32_t>(step >> 32);
      c2[l] = static_cast<uint32_t>(g0 + l);
      c3[l] = static_cast<uint32_t>((g0 + l) >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) k0 += philox::kWeyl0, k1 += philox::kWeyl1;
      for (int l = 0; l < kGroups; ++l) {
        const uint64_t p0 = static_cast<uint64_t>(philox::kMul0) * c0[l];
        const uint64_t p1 = static_cast<uint64_t>(philox::kMul1) * c2[l];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(p1);
        c3[l] = static_cast<uint32_t>(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
    }
    // Box–Muller on (c0, c1) -> lanes 0, 1 and (c2, c3) -> lanes 2, 3 of each group.
    alignas(32) float u1a[kGroups], anga[kGroups], u1b[kGroups], angb[kGroups];
    constexpr float kInv24 = 1.0f / 16777216.0f;
    constexpr float kTwoPi = 6.2831853071795864769f, kPi = 3.14159265358979323846f;
    for (int l = 0; l < kGroups; ++l) {
      u1a[l] = static_cast<float>(static_cast<int32_t>((c0[l] >> 8) + 1u)) * kInv24;
      anga[l] = static_cast<float>(static_cast<int32_t>(c1[l] >> 8)) * (kTwoPi * kInv24) - kPi;
      u1b[l] = static_cast<float>(static_cast<int32_t>((c2[l] >> 8) + 1u)) * kInv24;
      angb[l] = static_cast<float>(static_cast<int32_t>(c3[l] >> 8)) * (kTwoPi * kInv24) - kPi;
    }
    const Vec ra = (Vec(-2.0f) * Vec::loadu(u1a).log()).sqrt();
    const Vec rb = (Vec(-2.0f) * Vec::loadu(u1b).log()).sqrt();
    const Vec aa = Vec::loadu(anga), ab = Vec::loadu(angb);
    alignas(32) float z[4][kGroups];
    (ra * aa.cos()).store(z[0]);
    (ra * aa.sin()).store(z[1]);
    (rb * ab.cos()).store(z[2]);
    (rb * ab.sin()).store(z[3]);
    for (int l = 0; l < kGroups; ++l) {
      for (int r = 0; r < 4; ++r) out[i + 4 * l + r] = z[r][l];
    }
  }
  if (i < n) step_philox_fill(seed, offset, first + static_cast<uint64_t>(i), n - i, out + i);
}

// src[0, n) as float32: in place for float32, else converted into buf.
template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename xT, typename moT>
class StepKernel {
 public:
  StepKernel(const StepParams& p, const ItemCoefs* coefs) : p_(p), coefs_(coefs) {}

  // One unit: item b, elements [j0, j0 + n) of its C*S elements in memory order.
  void run_unit(int64_t b, int64_t j0, int64_t n) const {
    const int64_t L = p_.C * p_.S;
    const int64_t Cm = p_.learned ? 2 * p_.C : p_.C;
    const int64_t base = b * L + j0;  // first element, x's memory order
    const auto* mo_item = static_cast<const moT*>(p_.model_output) + b * Cm * p_.S;
    const bool need_var =
        p_.learned && p_.cfg.rule == step::kAncestral &&
        (p_.cfg.var_type == step::kLearned || p_.cfg.var_type == step::kLearnedRange);

    alignas(64) float xbuf[kChunk], mbuf[kChunk], vbuf[kChunk], zbuf[kChunk];
    alignas(64) float obuf[kChunk], pbuf[kChunk];
    const float* xs = as_float(static_cast<const xT*>(p_.x) + base, n, xbuf);
    const float* ms = mbuf;
    const float* vs = vbuf;
    if (!p_.learned || !p_.channels_last) {
      // [B, Cm, S]: the mean channels are one run, the variance channels C*S later.
      ms = as_float(mo_item + j0, n, mbuf);
      if (need_var) vs = as_float(mo_item + j0 + L, n, vbuf);
    } else {
      // [B, S, 2C]: position s holds C means, then C variances.
      int64_t s = j0 / p_.C, c = j0 - s * p_.C;
      for (int64_t i = 0; i < n; ++i) {
        const moT* at_s = mo_item + s * Cm;
        mbuf[i] = static_cast<float>(at_s[c]);
        if (need_var) vbuf[i] = static_cast<float>(at_s[p_.C + c]);
        if (++c == p_.C) c = 0, ++s;
      }
    }
    const float* zs = zbuf;
    const bool has_noise = p_.noise_mode != step::kNoNoise;
    if (p_.noise_mode == step::kExplicitNoise) {
      zs = as_float(static_cast<const xT*>(p_.noise) + base, n, zbuf);
    } else if (p_.noise_mode == step::kPhiloxNoise) {
      // This item's run of its sample's noise stream (common/step_params.h).
      philox_fill_vec(p_.philox.seed, p_.philox.offset,
                      step::noise_element(step::noise_sample(p_, b), L, j0), n, zbuf);
    }

    xT* out = static_cast<xT*>(p_.out) + base;
    xT* pred = p_.pred_xstart ? static_cast<xT*>(p_.pred_xstart) + base : nullptr;
    float* os = obuf;
    float* ps = pbuf;
    if constexpr (std::is_same_v<xT, float>) {
      os = out;
      if (pred) ps = pred;
    }

    const ItemCoefs& c = coefs_[b];
    if (need_var && vml::available()) {
      // σ for the whole chunk first: 0.5·log σ² into vbuf, then torch's exp over it.
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
        const Vec vv = cnt == Vec::size() ? Vec::loadu(vs + i) : Vec::loadu(vs + i, cnt);
        step::learned_half_log_variance<VecOps>(p_.cfg, c, vv).store(vbuf + i, cnt);
      }
      vml::exp(vbuf, vbuf, n);
      elements<true>(c, n, xs, ms, vbuf, zs, need_var, has_noise, os, pred ? ps : nullptr);
    } else {
      elements<false>(c, n, xs, ms, vs, zs, need_var, has_noise, os, pred ? ps : nullptr);
    }
    if constexpr (!std::is_same_v<xT, float>) {
      at::vec::convert(os, out, n);
      if (pred) at::vec::convert(ps, pred, n);
    }
  }

 private:
  // The step on n float32 elements (vs: σ itself when kSigmaGiven); results into os, and
  // pred_x0 into ps unless it is null.
  template <bool kSigmaGiven>
  void elements(const ItemCoefs& c, int64_t n, const float* xs, const float* ms, const float* vs,
                const float* zs, bool need_var, bool has_noise, float* os, float* ps) const {
    const Vec zero(0.0f);
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
      const bool full = cnt == Vec::size();
      const Vec xv = full ? Vec::loadu(xs + i) : Vec::loadu(xs + i, cnt);
      const Vec mv = full ? Vec::loadu(ms + i) : Vec::loadu(ms + i, cnt);
      const Vec vv = !need_var ? zero : (full ? Vec::loadu(vs + i) : Vec::loadu(vs + i, cnt));
      const Vec zv = !has_noise ? zero : (full ? Vec::loadu(zs + i) : Vec::loadu(zs + i, cnt));
      Vec x0;
      const Vec sample =
          step::step_element<VecOps, kSigmaGiven>(p_.cfg, c, xv, mv, vv, zv, has_noise, &x0);
      sample.store(os + i, cnt);
      if (ps) x0.store(ps + i, cnt);
    }
  }

  const StepParams& p_;
  const ItemCoefs* coefs_;
};

template <typename xT, typename moT>
void run_all(const StepParams& p, const ItemCoefs* coefs) {
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
void run_mo(const StepParams& p, const ItemCoefs* coefs) {
  switch (p.mo_dtype) {
    case DType::kFloat32: return run_all<xT, float>(p, coefs);
    case DType::kFloat16: return run_all<xT, c10::Half>(p, coefs);
    case DType::kBFloat16: return run_all<xT, c10::BFloat16>(p, coefs);
    case DType::kFloat64: return;  // not a step dtype (the glue checks kStepDtypes)
  }
}

}  // namespace

bool step_avx2(const StepParams& p, const ItemCoefs* coefs) {
  switch (p.x_dtype) {
    case DType::kFloat32: run_mo<float>(p, coefs); break;
    case DType::kFloat16: run_mo<c10::Half>(p, coefs); break;
    case DType::kBFloat16: run_mo<c10::BFloat16>(p, coefs); break;
    case DType::kFloat64: break;  // not a step dtype (the glue checks kStepDtypes)
  }
  return true;
}

}  // namespace iddpm::cpu::detail

#pragma GCC pop_options

#else  // no AVX2 build of this kernel: csrc/cpu/step.cpp runs its scalar kernel

#include "cpu/step_internal.h"

namespace iddpm::cpu::detail {
bool step_avx2(const step::StepParams&, const step::ItemCoefs*) { return false; }
}  // namespace iddpm::cpu::detail

#endif

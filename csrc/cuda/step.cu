// csrc/cuda/step.cu — CUDA kernels of the fused reverse-diffusion steps (CUDA C++17, no torch).
//
// One launch per step. Two kernels, both grid-stride loops over element groups:
//  - step_vec_kernel: VEC elements per group (16 bytes of x: 4 fp32 or 8 fp16/bf16) with
//    aligned vector loads and stores; used when the group never straddles two batch
//    items, the model output's mean and variance channels are contiguous runs
//    (channels-first, or C channels only) and every pointer is aligned.
//  - step_scalar_kernel: 4 elements per thread with scalar loads; any layout.
// Per-element math: common/step_math.h; noise: common/philox.h, numbered per sample
// (common/step_params.h noise_element; the sample indices are read on the device, so a
// captured step sees new indices on every replay). The Philox seed and offset are read in
// the kernel when the launch was captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/philox.h"
#include "common/step_math.h"
#include "cuda/convert.cuh"
#include "cuda/step.h"

namespace iddpm::cuda {
namespace {

using step::ItemCoefs;
using step::ScalarOps;
using step::StepParams;

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct SeedOffset {
  uint64_t seed, offset;
};

// As torch's at::cuda::philox::unpack: device memory when captured in a graph.
__device__ __forceinline__ SeedOffset unpack(const step::PhiloxSource& s) {
  if (s.captured) {
    return {static_cast<uint64_t>(*s.seed_ptr),
            static_cast<uint64_t>(*s.offset_ptr) + s.offset_intragraph};
  }
  return {s.seed, s.offset};
}

// The coefficients of item b; false (and zeros) when its t is outside [0, T).
__device__ __forceinline__ bool load_coefs(const StepParams& p, int64_t b, ItemCoefs* c) {
  const int64_t tt = p.t_is_int64 ? static_cast<const int64_t*>(p.t)[b]
                                  : static_cast<int64_t>(static_cast<const int32_t*>(p.t)[b]);
  if (tt < 0 || tt >= p.T) {
    *c = ItemCoefs{};
    return false;
  }
  *c = step::item_coefs(p.table + tt * p.K, tt, p.cfg);
  return true;
}

__device__ __forceinline__ bool needs_variance(const StepParams& p) {
  return p.learned && p.cfg.rule == step::kAncestral &&
         (p.cfg.var_type == step::kLearned || p.cfg.var_type == step::kLearnedRange);
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// x, noise, out, pred: [B, C*S] dense; model_output [B, Cm*S] channels-first (or Cm = C).
template <typename xT, typename moT, int VEC>
__global__ void __launch_bounds__(kThreads) step_vec_kernel(const StepParams p) {
  const int64_t L = p.C * p.S;
  const int64_t groups = p.B * L / VEC;
  const bool need_var = needs_variance(p);
  const bool has_noise = p.noise_mode != step::kNoNoise;
  SeedOffset key{0, 0};
  if (p.noise_mode == step::kPhiloxNoise) key = unpack(p.philox);
  const xT* __restrict__ x = static_cast<const xT*>(p.x);
  const moT* __restrict__ mo = static_cast<const moT*>(p.model_output);
  const xT* __restrict__ noise = static_cast<const xT*>(p.noise);
  xT* __restrict__ out = static_cast<xT*>(p.out);
  xT* __restrict__ pred = static_cast<xT*>(p.pred_xstart);

  int64_t cached_b = -1;
  ItemCoefs c{};
  bool valid = false;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i0 = g * VEC;
    const int64_t b = i0 / L;
    if (b != cached_b) {
      valid = load_coefs(p, b, &c);
      cached_b = b;
    }
    const int64_t mo_off = p.learned ? i0 + b * L : i0;  // b*2L + (i0 - b*L)
    const Pack<xT, VEC> xv = *reinterpret_cast<const Pack<xT, VEC>*>(x + i0);
    const Pack<moT, VEC> mv = *reinterpret_cast<const Pack<moT, VEC>*>(mo + mo_off);
    Pack<moT, VEC> vv;
    if (need_var) vv = *reinterpret_cast<const Pack<moT, VEC>*>(mo + mo_off + L);
    float z[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = 0.0f;
    if (p.noise_mode == step::kExplicitNoise) {
      const Pack<xT, VEC> nv = *reinterpret_cast<const Pack<xT, VEC>*>(noise + i0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = to_acc(nv.v[k]);
    } else if (p.noise_mode == step::kPhiloxNoise) {
      // L % VEC == 0 and VEC % 4 == 0 here: the group starts a Philox group of 4. (The
      // sample index is re-read per group, an L1 hit: caching it per item made ptxas spill.)
      const uint64_t group0 = step::noise_element(step::noise_sample(p, b), L, i0 - b * L) / 4;
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        philox::normal4(key.seed, key.offset, group0 + q, z + 4 * q);
      }
    }
    Pack<xT, VEC> ov, pv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float x0;
      float s =
          step::step_element<ScalarOps>(p.cfg, c, to_acc(xv.v[k]), to_acc(mv.v[k]),
                                        need_var ? to_acc(vv.v[k]) : 0.0f, z[k], has_noise, &x0);
      if (!valid) s = x0 = nan_f();
      ov.v[k] = from_acc<xT>(s);
      pv.v[k] = from_acc<xT>(x0);
    }
    *reinterpret_cast<Pack<xT, VEC>*>(out + i0) = ov;
    if (pred != nullptr) *reinterpret_cast<Pack<xT, VEC>*>(pred + i0) = pv;
  }
}

// Any layout of common/step_params.h; 4 consecutive elements per thread: one Philox draw
// when they lie in one Philox group (always without sample_index, or when C*S % 4 == 0),
// else one per Philox group they touch.
template <typename xT, typename moT>
__global__ void __launch_bounds__(kThreads) step_scalar_kernel(const StepParams p) {
  const int64_t L = p.C * p.S;
  const int64_t n = p.B * L;
  const int64_t groups = (n + 3) / 4;
  const int64_t Cm = p.learned ? 2 * p.C : p.C;
  const int64_t var_delta = p.channels_last ? p.C : L;
  const bool need_var = needs_variance(p);
  const bool has_noise = p.noise_mode != step::kNoNoise;
  SeedOffset key{0, 0};
  if (p.noise_mode == step::kPhiloxNoise) key = unpack(p.philox);
  const xT* __restrict__ x = static_cast<const xT*>(p.x);
  const moT* __restrict__ mo = static_cast<const moT*>(p.model_output);
  const xT* __restrict__ noise = static_cast<const xT*>(p.noise);
  xT* __restrict__ out = static_cast<xT*>(p.out);
  xT* __restrict__ pred = static_cast<xT*>(p.pred_xstart);

  int64_t cached_b = -1;
  ItemCoefs c{};
  bool valid = false;
  uint64_t noise_first = 0;  // Philox element of item b's first element
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint64_t z_group = ~uint64_t{0};  // the Philox group held in z (none yet)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = g * 4 + r;
      if (i >= n) break;
      const int64_t b = i / L;
      if (b != cached_b) {
        valid = load_coefs(p, b, &c);
        if (p.noise_mode == step::kPhiloxNoise) {
          noise_first = step::noise_element(step::noise_sample(p, b), L, 0);
        }
        cached_b = b;
      }
      const int64_t inner = i - b * L;
      float zr = 0.0f;
      if (p.noise_mode == step::kPhiloxNoise) {
        const uint64_t e = noise_first + static_cast<uint64_t>(inner);
        if (e / 4 != z_group) {
          z_group = e / 4;
          philox::normal4(key.seed, key.offset, z_group, z);
        }
        const unsigned lane = static_cast<unsigned>(e % 4);  // selects keep z in registers
        zr = lane == 0 ? z[0] : (lane == 1 ? z[1] : (lane == 2 ? z[2] : z[3]));
      }
      int64_t mo_off = i;
      if (p.learned) {
        if (p.channels_last) {
          const int64_t s = inner / p.C;
          mo_off = b * Cm * p.S + s * Cm + (inner - s * p.C);
        } else {
          mo_off = i + b * L;
        }
      }
      const float v = need_var ? to_acc(mo[mo_off + var_delta]) : 0.0f;
      const float zi = p.noise_mode == step::kExplicitNoise ? to_acc(noise[i]) : zr;
      float x0;
      float s = step::step_element<ScalarOps>(p.cfg, c, to_acc(x[i]), to_acc(mo[mo_off]), v, zi,
                                              has_noise, &x0);
      if (!valid) s = x0 = nan_f();
      out[i] = from_acc<xT>(s);
      if (pred != nullptr) pred[i] = from_acc<xT>(x0);
    }
  }
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        sms <= 0) {
      return 132;
    }
    cached[dev] = sms;
  }
  return cached[dev];
}

int blocks_for(int64_t work_items) {
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
}

bool aligned(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename xT, typename moT>
int launch(const StepParams& p, cudaStream_t stream) {
  constexpr int VEC = static_cast<int>(16 / sizeof(xT));
  const int64_t L = p.C * p.S;
  const bool vec_ok = L % VEC == 0 && !(p.learned && p.channels_last) &&
                      aligned(p.x, VEC * sizeof(xT)) && aligned(p.out, VEC * sizeof(xT)) &&
                      aligned(p.pred_xstart, VEC * sizeof(xT)) &&
                      aligned(p.model_output, VEC * sizeof(moT)) &&
                      (p.noise_mode != step::kExplicitNoise || aligned(p.noise, VEC * sizeof(xT)));
  if (vec_ok) {
    step_vec_kernel<xT, moT, VEC><<<blocks_for(p.B * L / VEC), kThreads, 0, stream>>>(p);
  } else {
    step_scalar_kernel<xT, moT><<<blocks_for((p.B * L + 3) / 4), kThreads, 0, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename xT>
int launch_mo(const StepParams& p, cudaStream_t stream) {
  switch (p.mo_dtype) {
    case DType::kFloat32: return launch<xT, float>(p, stream);
    case DType::kFloat16: return launch<xT, __half>(p, stream);
    case DType::kBFloat16: return launch<xT, __nv_bfloat16>(p, stream);
    default: break;  // not a step dtype (the glue checks kStepDtypes)
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int step(const step::StepParams& p, cudaStream_t stream) {
  if (p.B * p.C * p.S == 0) return 0;
  switch (p.x_dtype) {
    case DType::kFloat32: return launch_mo<float>(p, stream);
    case DType::kFloat16: return launch_mo<__half>(p, stream);
    case DType::kBFloat16: return launch_mo<__nv_bfloat16>(p, stream);
    default: break;  // not a step dtype (the glue checks kStepDtypes)
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace iddpm::cuda

// csrc/ops/step.cpp — torch glue of the fused reverse-diffusion steps:
//   iddpm::p_sample_step(x, model_output, t, table, mean_type, var_type, clip, noise?,
//                        generator?, return_pred_xstart, sample_index?) -> (x_{t-1}, pred_x0)
//   iddpm::ddim_step(..., clip, eta, noise?, generator?, return_pred_xstart, sample_index?)
//                        -> (x_{t-1}, pred_x0)
//   iddpm::ddim_reverse_step(..., clip, return_pred_xstart) -> (x_{t+1}, pred_x0)
//
// x: [B, C, *spatial] f32/f16/bf16; model_output: [B, C or 2C, *spatial] f32/f16/bf16
// (2C for the learned variance types); t: [B] int64/int32; table: [T, K>=18] f32 (the
// diffusion's coef_table); noise: x's shape and dtype. Outputs have x's dtype and layout;
// pred_x0 is an empty [0] tensor unless return_pred_xstart.
//
// Layout: x channels-first contiguous, or channels-last dense (strides of a
// [B, *spatial, C] tensor) is used as it is; any other x is made contiguous once. The
// model output and noise are brought to x's layout (copied once when they differ).
//
// Noise: `noise` when given (read where the rule needs noise), else drawn in the kernel
// (common/philox.h) from `generator` or the default generator of x's device: CUDA takes
// the generator's PhiloxCudaState (graph-capture safe), CPU keys Philox with a 64-bit
// number drawn from the CPU generator. DDIM with eta = 0 and reverse DDIM use no noise.
// sample_index: [B] int64/int32 on x's device, the global sample index of each batch item;
// item b's in-kernel noise is sample sample_index[b]'s run of the Philox stream
// (common/step_params.h), so it does not depend on the batch the sample is in. None: item b
// is sample b (the plain element index). Read on the device: graph replays see new values.
//
// Bad t: CPU raises ValueError; CUDA cannot without a host sync and writes NaN for that
// item instead (the Python wrappers validate t where they can).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/step_math.h"
#include "common/step_params.h"
#include "cpu/step.h"
#include "ops/checks.h"
#include "ops/dtype.h"

#ifdef IDDPM_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/step.h"
#endif

namespace iddpm::ops {
namespace {

using step::StepParams;

int32_t parse_mean_type(c10::string_view s) {
  if (s == "epsilon") return step::kEpsilon;
  if (s == "start_x") return step::kStartX;
  if (s == "previous_x") return step::kPreviousX;
  TORCH_CHECK_VALUE(false, "model_mean_type: expected 'epsilon', 'start_x' or 'previous_x', got '",
                    std::string(s), "'");
  return -1;
}

int32_t parse_var_type(c10::string_view s) {
  if (s == "fixed_small") return step::kFixedSmall;
  if (s == "fixed_large") return step::kFixedLarge;
  if (s == "learned") return step::kLearned;
  if (s == "learned_range") return step::kLearnedRange;
  TORCH_CHECK_VALUE(false,
                    "model_var_type: expected 'fixed_small', 'fixed_large', 'learned' or "
                    "'learned_range', got '",
                    std::string(s), "'");
  return -1;
}

void check_float_dtype(const at::Tensor& v, const char* name) {
  TORCH_CHECK_VALUE(dtype_in(v.scalar_type(), step::kStepDtypes), name, ": expected dtype ",
                    dtype_names(step::kStepDtypes), ", got ", v.scalar_type());
}

// Strides of a dense tensor of `sizes` stored as [B, *spatial, C].
std::vector<int64_t> channels_last_strides(at::IntArrayRef sizes) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(n);
  int64_t acc = 1;
  strides[1] = acc;
  acc *= std::max<int64_t>(sizes[1], 1);
  for (int64_t d = n - 1; d >= 2; --d) {
    strides[d] = acc;
    acc *= std::max<int64_t>(sizes[d], 1);
  }
  strides[0] = acc;
  return strides;
}

// True when `v` has these strides in every dimension of size > 1.
bool has_strides(const at::Tensor& v, const std::vector<int64_t>& strides) {
  for (int64_t d = 0; d < v.dim(); ++d) {
    if (v.size(d) > 1 && v.stride(d) != strides[d]) return false;
  }
  return true;
}

std::vector<int64_t> row_major_strides(at::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t acc = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = acc;
    acc *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}

bool is_channels_last_dense(const at::Tensor& v) {
  return v.dim() >= 3 && has_strides(v, channels_last_strides(v.sizes()));
}

// `v` dense in the chosen layout (copied once if it is not).
at::Tensor to_layout(const at::Tensor& v, bool channels_last) {
  if (!channels_last) return v.contiguous();
  const auto strides = channels_last_strides(v.sizes());
  if (has_strides(v, strides)) return v;
  return at::empty_strided(v.sizes(), strides, v.options()).copy_(v);
}

std::string expected_shape(const at::Tensor& x, int64_t channels) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s[1] = channels;
  return c10::str(at::IntArrayRef(s));
}

struct Prepared {
  at::Tensor x, mo, t, table, noise, sample_index, out, pred;
  StepParams p;
};

Prepared prepare(int32_t rule, const at::Tensor& x_in, const at::Tensor& mo_in,
                 const at::Tensor& t_in, const at::Tensor& table_in, c10::string_view mean_type,
                 c10::string_view var_type, bool clip, double eta,
                 const std::optional<at::Tensor>& noise_in, bool return_pred,
                 const std::optional<at::Tensor>& sample_index_in) {
  Prepared r;
  StepParams& p = r.p;
  p.cfg.rule = rule;
  p.cfg.mean_type = parse_mean_type(mean_type);
  p.cfg.var_type = parse_var_type(var_type);
  p.cfg.clip = clip;
  // 0 <= eta <= 1 keeps sqrt(1 - abar_prev - sigma^2) real at every step of every schedule
  // (iddpm_ext/core/checks.py, check_eta); NaN fails the test too.
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0,
                    "eta: expected a number in [0, 1] (DDIM's eta; above 1 the coefficient "
                    "sqrt(1 - abar_prev - sigma^2) is not real at some steps), got ",
                    eta);
  p.cfg.eta = static_cast<float>(eta);

  check_defined(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 2,
                    "x: expected a tensor [B, C, ...] with at least 2 dims, got shape ",
                    shape_str(x_in));
  check_float_dtype(x_in, "x");
  const int64_t B = x_in.size(0), C = x_in.size(1);

  check_defined(mo_in, "model_output");
  check_same_device(mo_in, "model_output", x_in, "x");
  check_float_dtype(mo_in, "model_output");
  p.learned = p.cfg.var_type == step::kLearned || p.cfg.var_type == step::kLearnedRange;
  // 2C without overflow (C may be near 2^63 when x is empty).
  const std::optional<int64_t> Cm = p.learned ? checked_mul(2, C) : std::optional<int64_t>(C);
  const bool shape_ok = Cm && mo_in.dim() == x_in.dim() && mo_in.size(0) == B &&
                        mo_in.size(1) == *Cm && mo_in.sizes().slice(2) == x_in.sizes().slice(2);
  TORCH_CHECK_VALUE(shape_ok, "model_output: expected shape ",
                    Cm ? expected_shape(x_in, *Cm) : "[B, 2·" + std::to_string(C) + ", ...]", " (",
                    p.learned ? "[B, 2C, ...]: mean and variance channels for model_var_type '"
                              : "[B, C, ...] for model_var_type '",
                    std::string(var_type), "'), got ", shape_str(mo_in));

  check_defined(t_in, "t");
  check_same_device(t_in, "t", x_in, "x");
  check_index_dtype(t_in, "t");
  TORCH_CHECK_VALUE(t_in.dim() == 1 && t_in.size(0) == B, "t: expected shape [", B,
                    "] (one timestep per batch item of x), got ", shape_str(t_in));

  check_defined(table_in, "table");
  check_same_device(table_in, "table", x_in, "x");
  check_dtype(table_in, "table", at::kFloat);
  TORCH_CHECK_VALUE(
      table_in.dim() == 2 && table_in.size(0) >= 1 && table_in.size(1) >= step::col::kMinColumns,
      "table: expected a [T, K] coefficient table with T >= 1 and K >= ", step::col::kMinColumns,
      " columns (GaussianDiffusion.coef_table, columns iddpm_ext.core.tables.COEF_NAMES), "
      "got shape ",
      shape_str(table_in));

  if (noise_in.has_value() && noise_in->defined()) {
    const at::Tensor& nz = *noise_in;
    check_same_device(nz, "noise", x_in, "x");
    TORCH_CHECK_VALUE(nz.sizes() == x_in.sizes(), "noise: expected shape ", shape_str(x_in),
                      " (the shape of x), got ", shape_str(nz));
    TORCH_CHECK_VALUE(nz.scalar_type() == x_in.scalar_type(), "noise: expected dtype ",
                      x_in.scalar_type(), " (the dtype of x), got ", nz.scalar_type());
  }

  const bool has_index = sample_index_in.has_value() && sample_index_in->defined();
  if (has_index) {
    const at::Tensor& si = *sample_index_in;
    check_same_device(si, "sample_index", x_in, "x");
    check_index_dtype(si, "sample_index");
    TORCH_CHECK_VALUE(si.dim() == 1 && si.size(0) == B, "sample_index: expected shape [", B,
                      "] (one global sample index per batch item of x), got ", shape_str(si));
  }

  // Layout: x as it is when channels-first contiguous or channels-last dense.
  const bool cl = !x_in.is_contiguous() && is_channels_last_dense(x_in);
  p.channels_last = cl;
  r.x = to_layout(x_in, cl);
  r.mo = to_layout(mo_in, cl);
  r.t = t_in.contiguous();
  r.table = table_in.contiguous();
  const std::vector<int64_t> strides =
      cl ? channels_last_strides(x_in.sizes()) : row_major_strides(x_in.sizes());
  r.out = at::empty_strided(x_in.sizes(), strides, x_in.options());
  r.pred = return_pred ? at::empty_strided(x_in.sizes(), strides, x_in.options())
                       : at::empty({0}, x_in.options());

  const bool wants_noise = rule == step::kAncestral || (rule == step::kDdim && eta != 0.0);
  p.noise_mode = step::kNoNoise;
  if (wants_noise) {
    if (noise_in.has_value() && noise_in->defined()) {
      r.noise = to_layout(*noise_in, cl);
      p.noise_mode = step::kExplicitNoise;
      p.noise = r.noise.data_ptr();
    } else {
      p.noise_mode = step::kPhiloxNoise;
      if (has_index) {
        r.sample_index = sample_index_in->contiguous();
        p.sample_index = r.sample_index.data_ptr();
        p.sample_index_is_int64 = r.sample_index.scalar_type() == at::kLong;
      }
    }
  }

  p.B = B;
  p.C = C;
  p.S = B * C == 0 ? 0 : x_in.numel() / (B * C);
  p.x = r.x.data_ptr();
  p.x_dtype = dtype_of(x_in);
  p.model_output = r.mo.data_ptr();
  p.mo_dtype = dtype_of(mo_in);
  p.out = r.out.data_ptr();
  p.pred_xstart = return_pred ? r.pred.data_ptr() : nullptr;
  p.t = r.t.data_ptr();
  p.t_is_int64 = r.t.scalar_type() == at::kLong;
  p.table = r.table.data_ptr<float>();
  p.T = r.table.size(0);
  p.K = r.table.size(1);
  return r;
}

void check_generator_device(const std::optional<at::Generator>& gen, const at::Tensor& x) {
  if (!gen.has_value() || !gen->defined()) return;
  TORCH_CHECK_VALUE(gen->device().type() == x.device().type(), "generator: expected a ",
                    c10::DeviceTypeName(x.device().type(), /*lower_case=*/true),
                    " generator (x is on ", x.device(), "), got one on ", gen->device());
  // CUDA generators are per device: another device's seed and offset (in graph capture, its
  // device pointers) are not x's.
  TORCH_CHECK_VALUE(!x.is_cuda() || gen->device().index() == x.device().index(),
                    "generator: expected a generator of x's device ", x.device(), ", got one on ",
                    gen->device());
}

void run_cpu(Prepared& r, const std::optional<at::Generator>& generator) {
  if (r.p.noise_mode == step::kPhiloxNoise) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    r.p.philox.seed = gen->random64();  // a fresh key per call; offset 0
    r.p.philox.offset = 0;
  }
  check_timesteps(r.t, cpu::step(r.p), r.p.T);
}

#ifdef IDDPM_WITH_CUDA
void run_cuda(Prepared& r, const std::optional<at::Generator>& generator) {
  const c10::cuda::CUDAGuard guard(r.x.device());
  if (r.p.noise_mode == step::kPhiloxNoise) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(r.x.device().index()));
    at::PhiloxCudaState state;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      state = gen->philox_cuda_state(4);  // one counter step per call (common/philox.h)
    }
    step::PhiloxSource& src = r.p.philox;
    src.captured = state.captured_;
    if (state.captured_) {
      src.seed_ptr = state.seed_.ptr;
      src.offset_ptr = state.offset_.ptr;
      src.offset_intragraph = state.offset_intragraph_;
    } else {
      src.seed = state.seed_.val;
      src.offset = state.offset_.val;
    }
  }
  const int err = cuda::step(r.p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}
#endif

std::tuple<at::Tensor, at::Tensor> run(int32_t rule, const at::Tensor& x, const at::Tensor& mo,
                                       const at::Tensor& t, const at::Tensor& table,
                                       c10::string_view mean_type, c10::string_view var_type,
                                       bool clip, double eta,
                                       const std::optional<at::Tensor>& noise,
                                       const std::optional<at::Generator>& generator,
                                       bool return_pred,
                                       const std::optional<at::Tensor>& sample_index) {
  check_defined(x, "x");
  check_generator_device(generator, x);
  Prepared r = prepare(rule, x, mo, t, table, mean_type, var_type, clip, eta, noise, return_pred,
                       sample_index);
  if (x.is_cuda()) {
#ifdef IDDPM_WITH_CUDA
    run_cuda(r, generator);
#else
    TORCH_CHECK(false, "iddpm_ext was built without CUDA");
#endif
  } else {
    TORCH_CHECK_VALUE(x.is_cpu(), "x: expected a CPU or CUDA tensor, got one on ", x.device());
    run_cpu(r, generator);
  }
  return {r.out, r.pred};
}

std::tuple<at::Tensor, at::Tensor> p_sample_step(
    const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
    const at::Tensor& table, c10::string_view model_mean_type, c10::string_view model_var_type,
    bool clip_denoised, const std::optional<at::Tensor>& noise,
    std::optional<at::Generator> generator, bool return_pred_xstart,
    const std::optional<at::Tensor>& sample_index) {
  return run(step::kAncestral, x, model_output, t, table, model_mean_type, model_var_type,
             clip_denoised, 0.0, noise, generator, return_pred_xstart, sample_index);
}

std::tuple<at::Tensor, at::Tensor> ddim_step(const at::Tensor& x, const at::Tensor& model_output,
                                             const at::Tensor& t, const at::Tensor& table,
                                             c10::string_view model_mean_type,
                                             c10::string_view model_var_type, bool clip_denoised,
                                             double eta, const std::optional<at::Tensor>& noise,
                                             std::optional<at::Generator> generator,
                                             bool return_pred_xstart,
                                             const std::optional<at::Tensor>& sample_index) {
  return run(step::kDdim, x, model_output, t, table, model_mean_type, model_var_type, clip_denoised,
             eta, noise, generator, return_pred_xstart, sample_index);
}

std::tuple<at::Tensor, at::Tensor> ddim_reverse_step(const at::Tensor& x,
                                                     const at::Tensor& model_output,
                                                     const at::Tensor& t, const at::Tensor& table,
                                                     c10::string_view model_mean_type,
                                                     c10::string_view model_var_type,
                                                     bool clip_denoised, bool return_pred_xstart) {
  return run(step::kDdimReverse, x, model_output, t, table, model_mean_type, model_var_type,
             clip_denoised, 0.0, std::nullopt, std::nullopt, return_pred_xstart, std::nullopt);
}

// The same functions serve both dispatch keys (run() picks the device).
void impl_step_ops(torch::Library& m) {
  m.impl("p_sample_step", &p_sample_step);
  m.impl("ddim_step", &ddim_step);
  m.impl("ddim_reverse_step", &ddim_reverse_step);
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm, CPU, m) { impl_step_ops(m); }

#ifdef IDDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(iddpm, CUDA, m) { impl_step_ops(m); }
#endif

}  // namespace iddpm::ops

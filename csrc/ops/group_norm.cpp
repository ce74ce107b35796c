// csrc/ops/group_norm.cpp — torch glue of the fused GroupNorm + scale-shift + SiLU:
//
//   iddpm::group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale,
//                         Tensor? shift, float eps, bool silu) -> (Tensor out, Tensor mean,
//                                                                  Tensor rstd)
//     x: [N, C, *] float32/float64/float16/bfloat16, NCHW-contiguous or (4-D) channels-last;
//     weight, bias: [C]; scale, shift: [N, C] (any float dtype). out = act(GN(x)·w + b) with
//     ·(1 + scale) + shift before act (SiLU when silu, else identity), computed in float32
//     (float64 for float64 x) and rounded once to x's dtype, in x's memory format. mean, rstd:
//     [N, num_groups] statistics (float32; float64 for float64 x), saved for the backward.
//   iddpm::group_norm_act_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd,
//                                  int num_groups, Tensor? weight, Tensor? bias, Tensor? scale,
//                                  Tensor? shift, bool silu)
//       -> (grad_x, grad_weight [C], grad_bias [C], grad_scale [N, C], grad_shift [N, C])
//     each gradient in the dtype of its input (weight/bias/scale/shift; the statistics' dtype
//     for one that is None), grad_x in x's dtype and memory format.
// The math is common/group_norm_math.h; the kernels csrc/cpu/group_norm* and
// csrc/cuda/group_norm.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "common/group_norm_params.h"
#include "cpu/group_norm.h"
#include "cuda/group_norm.h"  // plain C++: the CUDA kernels' dtypes
#include "ops/checks.h"
#include "ops/dtype.h"

#ifdef IDDPM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace iddpm::ops {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool is_float(at::ScalarType t) { return to_dtype(t).has_value(); }

// Checks x, num_groups and eps; returns the shape (dtype, N, C, S, G, layout).
GroupNormShape check_x(const at::Tensor& x, int64_t num_groups) {
  check_defined(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected a tensor [N, C, *] of at least 2 dims, got shape ",
                    shape_str(x));
  if (x.is_cuda()) {
    TORCH_CHECK_VALUE(dtype_in(x.scalar_type(), cuda::kGroupNormDtypes), "x: expected dtype ",
                      dtype_names(cuda::kGroupNormDtypes), " on CUDA, got ", x.scalar_type());
  } else {
    TORCH_CHECK_VALUE(x.is_cpu(), "x: expected a CPU or CUDA tensor, got one on ", x.device());
    TORCH_CHECK_VALUE(dtype_in(x.scalar_type(), cpu::kGroupNormDtypes), "x: expected dtype ",
                      dtype_names(cpu::kGroupNormDtypes), " on CPU, got ", x.scalar_type());
  }
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(num_groups >= 1 && C % num_groups == 0,
                    "num_groups: expected a positive divisor of the channel count C = ", C,
                    " (dim 1 of x, shape ", shape_str(x), "), got ", num_groups);
  if (x.is_cuda()) {
    const std::optional<int64_t> ng = checked_mul(x.size(0), num_groups);
    TORCH_CHECK_VALUE(ng && *ng <= cuda::kGroupNormMaxItemGroups, "num_groups: expected at most ",
                      cuda::kGroupNormMaxItemGroups, " batch items × groups on CUDA, got ",
                      x.size(0), " × ", num_groups, " (x of shape ", shape_str(x), ")");
  }
  GroupNormShape s;
  s.dtype = dtype_of(x);
  s.N = x.size(0);
  s.C = C;
  s.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.S *= x.size(d);
  s.G = num_groups;
  s.channels_last = is_channels_last(x);
  return s;
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps: expected a finite number > 0, got ", eps);
}

// A [C] (weight, bias) or [N, C] (scale, shift) float tensor on x's device, or None.
void check_param(const OptTensor& t, const char* name, const at::Tensor& x, bool per_sample) {
  if (!t.has_value() || !t->defined()) return;
  check_same_device(*t, name, x, "x");
  TORCH_CHECK_VALUE(is_float(t->scalar_type()), name,
                    ": expected a floating-point dtype (float32, float64, float16 or bfloat16), "
                    "got ",
                    t->scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  if (per_sample) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == N && t->size(1) == C, name,
                      ": expected shape [", N, ", ", C, "] ([N, C] of x), got ", shape_str(*t));
  } else {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, name, ": expected shape [", C,
                      "] ([C] of x), got ", shape_str(*t));
  }
}

// The parameter as a contiguous tensor of the accumulation type (undefined for None).
at::Tensor as_acc(const OptTensor& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_args(const at::Tensor& x, int64_t num_groups, const OptTensor& weight,
                const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                GroupNormShape& s) {
  s = check_x(x, num_groups);
  check_param(weight, "weight", x, false);
  check_param(bias, "bias", x, false);
  check_param(scale, "scale", x, true);
  check_param(shift, "shift", x, true);
}

struct Forward {
  GroupNormActFwdParams p;
  at::Tensor x, y, mean, rstd, weight, bias, scale, shift;  // kept alive for the kernel
};

Forward prepare_forward(const at::Tensor& x_in, int64_t num_groups, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                        double eps, bool silu) {
  Forward f;
  check_args(x_in, num_groups, weight, bias, scale, shift, f.p.s);
  check_eps(eps);
  f.p.s.silu = silu;
  const at::ScalarType acc = acc_type(x_in);
  f.x = x_in.contiguous(format_of(x_in));
  f.y = at::empty_like(f.x, f.x.options(), format_of(x_in));
  f.mean = at::empty({f.p.s.N, num_groups}, x_in.options().dtype(acc));
  f.rstd = at::empty_like(f.mean);
  f.weight = as_acc(weight, acc);
  f.bias = as_acc(bias, acc);
  f.scale = as_acc(scale, acc);
  f.shift = as_acc(shift, acc);
  f.p.x = f.x.data_ptr();
  f.p.y = f.y.data_ptr();
  f.p.mean = f.mean.data_ptr();
  f.p.rstd = f.rstd.data_ptr();
  f.p.weight = ptr(f.weight);
  f.p.bias = ptr(f.bias);
  f.p.scale = ptr(f.scale);
  f.p.shift = ptr(f.shift);
  f.p.eps = eps;
  return f;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Backward {
  GroupNormActBwdParams p;
  at::Tensor dy, x, dx, mean, rstd, weight, bias, scale, shift, gw, gb, gsc, gsh, work;
  OptTensor weight_in, bias_in, scale_in, shift_in;
  Grads result() const {
    auto like = [](const at::Tensor& g, const OptTensor& t) {
      return t.has_value() && t->defined() ? g.to(t->scalar_type()) : g;
    };
    return {dx, like(gw, weight_in), like(gb, bias_in), like(gsc, scale_in), like(gsh, shift_in)};
  }
};

void check_stat(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t G) {
  check_defined(t, name);
  check_same_device(t, name, x, "x");
  check_dtype(t, name, acc_type(x));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == G, name,
                    ": expected shape [", x.size(0), ", ", G, "] ([N, num_groups]), got ",
                    shape_str(t));
}

Backward prepare_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                          const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                          const OptTensor& weight, const OptTensor& bias, const OptTensor& scale,
                          const OptTensor& shift, bool silu) {
  Backward b;
  check_args(x_in, num_groups, weight, bias, scale, shift, b.p.s);
  b.p.s.silu = silu;
  check_defined(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x_in, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes(), "grad_out: expected shape ", shape_str(x_in),
                    " (that of x), got ", shape_str(grad_out));
  check_same_dtype(grad_out, "grad_out", x_in, "x");
  check_stat(mean, "mean", x_in, num_groups);
  check_stat(rstd, "rstd", x_in, num_groups);
  const at::ScalarType acc = acc_type(x_in);
  const at::MemoryFormat fmt = format_of(x_in);
  b.x = x_in.contiguous(fmt);
  b.dy = grad_out.contiguous(fmt);
  b.dx = at::empty_like(b.x, b.x.options(), fmt);
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  b.weight = as_acc(weight, acc);
  b.bias = as_acc(bias, acc);
  b.scale = as_acc(scale, acc);
  b.shift = as_acc(shift, acc);
  b.weight_in = weight;
  b.bias_in = bias;
  b.scale_in = scale;
  b.shift_in = shift;
  const int64_t N = b.p.s.N, C = b.p.s.C;
  const auto opts = x_in.options().dtype(acc);
  b.gw = at::empty({C}, opts);
  b.gb = at::empty({C}, opts);
  b.gsc = at::empty({N, C}, opts);
  b.gsh = at::empty({N, C}, opts);
  b.p.grad_out = b.dy.data_ptr();
  b.p.x = b.x.data_ptr();
  b.p.grad_x = b.dx.data_ptr();
  b.p.mean = b.mean.data_ptr();
  b.p.rstd = b.rstd.data_ptr();
  b.p.weight = ptr(b.weight);
  b.p.bias = ptr(b.bias);
  b.p.scale = ptr(b.scale);
  b.p.shift = ptr(b.shift);
  b.p.grad_weight = b.gw.data_ptr();
  b.p.grad_bias = b.gb.data_ptr();
  b.p.grad_scale = b.gsc.data_ptr();
  b.p.grad_shift = b.gsh.data_ptr();
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& scale, const OptTensor& shift, double eps, bool silu) {
  Forward f = prepare_forward(x, num_groups, weight, bias, scale, shift, eps, silu);
  cpu::group_norm_act_fwd(f.p);
  return {f.y, f.mean, f.rstd};
}

Grads group_norm_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& rstd,
                                  int64_t num_groups, const OptTensor& weight,
                                  const OptTensor& bias, const OptTensor& scale,
                                  const OptTensor& shift, bool silu) {
  Backward b =
      prepare_backward(grad_out, x, mean, rstd, num_groups, weight, bias, scale, shift, silu);
  cpu::group_norm_act_bwd(b.p);
  return b.result();
}

#ifdef IDDPM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& scale, const OptTensor& shift, double eps, bool silu) {
  // Every check first (prepare_forward), then the device: a guard made from an x that another
  // argument's device sent here, on the CPU, would fail without naming the argument.
  Forward f = prepare_forward(x, num_groups, weight, bias, scale, shift, eps, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  const int err = cuda::group_norm_act_fwd(f.p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {f.y, f.mean, f.rstd};
}

Grads group_norm_act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& rstd,
                                   int64_t num_groups, const OptTensor& weight,
                                   const OptTensor& bias, const OptTensor& scale,
                                   const OptTensor& shift, bool silu) {
  Backward b =  // every check first, as in the forward
      prepare_backward(grad_out, x, mean, rstd, num_groups, weight, bias, scale, shift, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = b.p.s.N, C = b.p.s.C, G = b.p.s.G;
  b.work = at::empty({2 * N * C + 2 * N * G}, b.gw.options());
  b.p.work = b.work.data_ptr();
  const int err = cuda::group_norm_act_bwd(b.p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return b.result();
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(iddpm, CPU, m) {
  m.impl("group_norm_act", &group_norm_act_cpu);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cpu);
}

#ifdef IDDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(iddpm, CUDA, m) {
  m.impl("group_norm_act", &group_norm_act_cuda);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cuda);
}
#endif

}  // namespace iddpm::ops

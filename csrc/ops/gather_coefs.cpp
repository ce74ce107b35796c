// csrc/ops/gather_coefs.cpp — torch glue of iddpm::gather_coefs(table, t) -> out.
//
// table: [T, K] float32, one row of K schedule coefficients per timestep.
// t:     [B] int64/int32 timesteps on the table's device.
// out:   [B, K] float32, out[b] = table[t[b]].
// CPU raises on an out-of-range t; CUDA writes NaN rows instead (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/gather_coefs_params.h"
#include "cpu/gather_coefs.h"
#include "ops/checks.h"

#ifdef IDDPM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/gather_coefs.h"
#endif

namespace iddpm::ops {
namespace {

// Checks shared by every backend; returns the contiguous table.
at::Tensor check_gather_args(const at::Tensor& table, const at::Tensor& t) {
  check_defined(table, "table");
  check_defined(t, "t");
  check_dim(table, "table", 2, "[T, K]");
  check_dtype(table, "table", at::kFloat);
  check_dim(t, "t", 1, "[B]");
  check_index_dtype(t, "t");
  check_same_device(t, "t", table, "table");
  // Before the [B, K] output is allocated: no timestep is valid in a table without rows.
  TORCH_CHECK_VALUE(table.size(0) >= 1 || t.size(0) == 0,
                    "table: expected at least one row (T >= 1) to gather ", t.size(0),
                    " timesteps from, got shape ", shape_str(table));
  return table.contiguous();
}

// table: [T, K] f32 contiguous, t: [B] contiguous, out: [B, K] f32.
GatherCoefsParams params(const at::Tensor& table, const at::Tensor& t, at::Tensor& out) {
  GatherCoefsParams p;
  p.table = table.data_ptr<float>();
  p.T = table.size(0);
  p.K = table.size(1);
  p.t = t.data_ptr();
  p.t_is_int64 = t.scalar_type() == at::kLong;
  p.B = t.size(0);
  p.out = out.data_ptr<float>();
  return p;
}

at::Tensor gather_coefs_cpu(const at::Tensor& table_in, const at::Tensor& t_in) {
  const at::Tensor table = check_gather_args(table_in, t_in);
  const at::Tensor t = t_in.contiguous();
  at::Tensor out = at::empty({t.size(0), table.size(1)}, table.options());
  check_timesteps(t, cpu::gather_coefs(params(table, t, out)), table.size(0));
  return out;
}

#ifdef IDDPM_WITH_CUDA
at::Tensor gather_coefs_cuda(const at::Tensor& table_in, const at::Tensor& t_in) {
  const at::Tensor table = check_gather_args(table_in, t_in);
  const at::Tensor t = t_in.contiguous();
  const c10::cuda::CUDAGuard guard(table.device());
  at::Tensor out = at::empty({t.size(0), table.size(1)}, table.options());
  const int err = cuda::gather_coefs(params(table, t, out), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(iddpm, CPU, m) { m.impl("gather_coefs", &gather_coefs_cpu); }

#ifdef IDDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(iddpm, CUDA, m) { m.impl("gather_coefs", &gather_coefs_cuda); }
#endif

}  // namespace iddpm::ops

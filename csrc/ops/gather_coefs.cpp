// csrc/ops/gather_coefs.cpp — torch glue of iddpm::gather_coefs(table, t) -> out.
//
// table: [T, K] float32, one row of K schedule coefficients per timestep.
// t:     [B] int64/int32 timesteps on the table's device.
// out:   [B, K] float32, out[b] = table[t[b]].
// CPU raises on an out-of-range t; CUDA writes NaN rows instead (no host sync).
#include <ATen/ATen.h>
#include <torch/library.h>

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
  return table.contiguous();
}

at::Tensor gather_coefs_cpu(const at::Tensor& table_in, const at::Tensor& t_in) {
  const at::Tensor table = check_gather_args(table_in, t_in);
  const at::Tensor t = t_in.contiguous();
  const int64_t T = table.size(0), K = table.size(1), B = t.size(0);
  at::Tensor out = at::empty({B, K}, table.options());
  int64_t bad = -1;
  if (t.scalar_type() == at::kLong) {
    bad = cpu::gather_coefs(table.data_ptr<float>(), T, K, t.data_ptr<int64_t>(), B,
                            out.data_ptr<float>());
  } else {
    bad = cpu::gather_coefs(table.data_ptr<float>(), T, K, t.data_ptr<int32_t>(), B,
                            out.data_ptr<float>());
  }
  if (bad >= 0) {
    const int64_t value = t.scalar_type() == at::kLong ? t.data_ptr<int64_t>()[bad]
                                                       : t.data_ptr<int32_t>()[bad];
    TORCH_CHECK_VALUE(false, "t: expected timesteps in [0, ", T, ") (the table has ", T,
                      " rows), got t[", bad, "] = ", value);
  }
  return out;
}

#ifdef IDDPM_WITH_CUDA
at::Tensor gather_coefs_cuda(const at::Tensor& table_in, const at::Tensor& t_in) {
  const at::Tensor table = check_gather_args(table_in, t_in);
  const at::Tensor t = t_in.contiguous();
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t T = table.size(0), K = table.size(1), B = t.size(0);
  at::Tensor out = at::empty({B, K}, table.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int err = 0;
  if (t.scalar_type() == at::kLong) {
    err = cuda::gather_coefs(table.data_ptr<float>(), T, K, t.data_ptr<int64_t>(), B,
                             out.data_ptr<float>(), stream);
  } else {
    err = cuda::gather_coefs(table.data_ptr<float>(), T, K, t.data_ptr<int32_t>(), B,
                             out.data_ptr<float>(), stream);
  }
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

// csrc/common/group_norm_params.h — the plain argument blocks of iddpm::group_norm_act and its
// backward. No torch and no CUDA types: the glue in csrc/ops fills them, csrc/cpu and csrc/cuda
// read them.
//
// x is [N, C, S] (S = the product of the spatial dims; NCHW-contiguous) or, with channels_last,
// [N, S, C] in memory. "acc" is the accumulation type: double for float64 x, float otherwise;
// the small per-channel / per-sample tensors (weight, bias, scale, shift, mean, rstd and the
// parameter gradients) are contiguous arrays of it (the glue converts them).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace iddpm {

struct GroupNormShape {
  DType dtype = DType::kFloat32;  // of x, y, grad_out, grad_x
  int64_t N = 0, C = 0, S = 0, G = 1;
  bool channels_last = false;
  bool silu = true;
};

struct GroupNormActFwdParams {
  GroupNormShape s;
  const void* x = nullptr;
  void* y = nullptr;                              // like x
  const void *weight = nullptr, *bias = nullptr;  // [C] acc or null (1 / 0)
  const void *scale = nullptr, *shift = nullptr;  // [N, C] acc or null (0 / 0)
  double eps = 1e-5;
  void *mean = nullptr, *rstd = nullptr;  // [N, G] acc, written
};

struct GroupNormActBwdParams {
  GroupNormShape s;
  const void* grad_out = nullptr;  // like x
  const void* x = nullptr;
  void* grad_x = nullptr;  // like x
  const void *weight = nullptr, *bias = nullptr;
  const void *scale = nullptr, *shift = nullptr;
  const void *mean = nullptr, *rstd = nullptr;        // [N, G] acc, from the forward
  void *grad_weight = nullptr, *grad_bias = nullptr;  // [C] acc, written
  void *grad_scale = nullptr, *grad_shift = nullptr;  // [N, C] acc, written
  void* work = nullptr;  // CUDA only: 2·N·C + 2·N·G acc of scratch (the backward's sums)
};

}  // namespace iddpm

// python/module.cpp — the pybind11 module iddpm_ext._C: build facts, version, and what the
// compiled kernels accept (capabilities). Importing it also registers the `iddpm` torch ops
// (schemas.cpp, csrc/ops). Always `import torch` before importing this module.
//
// Plain pybind11, no torch headers: the capabilities are read from the plain C++ headers of
// csrc/, the same constants the argument checks in csrc/ops use.
#include <pybind11/pybind11.h>

#include <cstddef>

#include "common/dtype.h"
#include "common/step_math.h"  // step::col::kMinColumns
#include "common/step_params.h"
#include "cpu/attention.h"
#include "cpu/group_norm.h"
#include "cpu/torch_vml.h"
#include "cpu/winograd.h"
#include "cuda/attention.h"
#include "cuda/group_norm.h"

namespace py = pybind11;

#ifndef IDDPM_VERSION
#define IDDPM_VERSION "0.0.0+unknown"
#endif

namespace {

using iddpm::DType;

#ifdef IDDPM_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// The ops of the `iddpm` namespace, as python/schemas.cpp defines them (tests/ops/test_build.py
// checks that the two agree).
constexpr const char* kOps[] = {
    "gather_coefs",      "p_sample_step",           "ddim_step",
    "ddim_reverse_step", "qkv_attention",           "qkv_attention_backward",
    "group_norm_act",    "group_norm_act_backward", "winograd_weight",
    "conv3x3_winograd",  "qkv_attention_bf16",      "conv3x3_winograd_weight_grad",
    "convert_layout"};

py::dict build_info() {
  py::dict d;
  d["version"] = IDDPM_VERSION;
  d["torch_version"] = IDDPM_TORCH_VERSION;
#ifdef IDDPM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = IDDPM_CUDA_VERSION;
  d["arch_list"] = IDDPM_ARCH_LIST;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["arch_list"] = "";
#endif
#ifdef IDDPM_WITH_SM90
  d["attention_sm90"] = true;  // the Hopper attention kernels (sm_90a) are compiled in
#else
  d["attention_sm90"] = false;
#endif
  d["cuda_reason"] = IDDPM_CUDA_REASON;  // why CUDA was not built ("" when it was)
  d["compiler"] = IDDPM_COMPILER;
  d["build_type"] = IDDPM_BUILD_TYPE;
  d["cxx_standard"] = static_cast<long>(__cplusplus);
  return d;
}

template <class T, size_t N, class Item>
py::list to_list(const T (&xs)[N], Item item) {
  py::list l;
  for (const T& x : xs) l.append(item(x));
  return l;
}

template <size_t N>
py::list dtype_names(const DType (&dtypes)[N]) {
  return to_list(dtypes, [](DType d) { return py::str(iddpm::dtype_name(d)); });
}

// What the compiled kernels accept, as a plain dict (read by iddpm_ext at import):
//   {"cuda": bool,                     CUDA kernels compiled in (= build_info()["cuda"])
//    "ops": [str, ...],                the torch.ops.iddpm op names
//    "step": {                         p_sample_step, ddim_step, ddim_reverse_step
//      "cpu":  {"dtypes": [str, ...],    of x (and noise, outputs) and model_output
//               "min_table_columns": int,   K of the [T, K] coefficient table, at least
//               "torch_exp_sqrt": bool},    exp and sqrt are torch's own (oneMKL VML found):
//                                           the step is then the eager path's bit for bit
//      "cuda": {"dtypes", "min_table_columns"} as on the CPU, or None without CUDA},
//    "attention": {                    qkv_attention, qkv_attention_backward
//      "cpu":  {"dtypes": [str, ...], "head_dims": "any"},
//      "cuda": {"dtypes": [str, ...], "head_dims": [int, ...], "head_dim_step": int,
//               "max_head_dim": int, "max_positions": int, "max_batch_heads": int}
//              or None without CUDA},
//    "group_norm": {                   group_norm_act, group_norm_act_backward
//      "cpu":  {"dtypes": [str, ...], "isa": str},   isa: the vector build run here
//      "cuda": {"dtypes": [str, ...]} or None without CUDA},
//    "winograd": {                     winograd_weight, conv3x3_winograd,
//                                      conv3x3_winograd_weight_grad (float32 only)
//      "cpu":  {"dtypes": [str, ...], "isa": str, "packed": bool},   isa: the vector build run
//              here; packed: the packed bf16 weight runs here (AVX512-BF16)
//      "cuda": None},
//    "attention_bf16": {               qkv_attention_bf16
//      "cpu":  {"dtypes": ["bfloat16"], "head_dims": "any", "isa": str},   isa: the build run
//              here when asked ("avx512_bf16": AVX512-BF16 products; else emulated; the
//              environment's IDDPM_ATTN_CPU_ISA is read per call)
//      "cuda": None}}
// (CUDA head dims: every multiple of head_dim_step up to max_head_dim, all listed.)
// dtypes are torch's names ("float32", "float64", "float16", "bfloat16"); a dtype or head dim
// not listed gets a ValueError from the op. gather_coefs takes a float32 table on every device.
py::dict capabilities() {
  py::dict step_cpu, attention_cpu;
  step_cpu["dtypes"] = dtype_names(iddpm::step::kStepDtypes);
  step_cpu["min_table_columns"] = iddpm::step::col::kMinColumns;
  step_cpu["torch_exp_sqrt"] = iddpm::cpu::vml::available();
  attention_cpu["dtypes"] = dtype_names(iddpm::cpu::kAttentionDtypes);
  attention_cpu["head_dims"] = "any";

  py::object step_cuda = py::none(), attention_cuda = py::none();
  if (kWithCuda) {
    py::dict s, a;
    s["dtypes"] = dtype_names(iddpm::step::kStepDtypes);
    s["min_table_columns"] = iddpm::step::col::kMinColumns;
    a["dtypes"] = dtype_names(iddpm::cuda::kAttentionDtypes);
    a["head_dims"] = to_list(iddpm::cuda::kAttentionHeadDims.v, [](int c) { return py::int_(c); });
    a["head_dim_step"] = iddpm::cuda::kAttentionHeadDimStep;
    a["max_head_dim"] = iddpm::cuda::kAttentionMaxHeadDim;
    a["max_positions"] = iddpm::cuda::kAttentionMaxPositions;
    a["max_batch_heads"] = iddpm::cuda::kAttentionMaxBatchHeads;
    step_cuda = s;
    attention_cuda = a;
  }

  py::dict gn_cpu;
  gn_cpu["dtypes"] = dtype_names(iddpm::cpu::kGroupNormDtypes);
  gn_cpu["isa"] = iddpm::cpu::group_norm_isa();
  py::object gn_cuda = py::none();
  if (kWithCuda) {
    py::dict g;
    g["dtypes"] = dtype_names(iddpm::cuda::kGroupNormDtypes);
    gn_cuda = g;
  }

  py::dict step, attention, group_norm, caps;
  step["cpu"] = step_cpu;
  step["cuda"] = step_cuda;
  attention["cpu"] = attention_cpu;
  attention["cuda"] = attention_cuda;
  caps["cuda"] = kWithCuda;
  caps["ops"] = to_list(kOps, [](const char* name) { return py::str(name); });
  caps["step"] = step;
  caps["attention"] = attention;
  group_norm["cpu"] = gn_cpu;
  group_norm["cuda"] = gn_cuda;
  caps["group_norm"] = group_norm;
  py::dict winograd, wino_cpu;
  wino_cpu["dtypes"] = dtype_names(iddpm::cpu::kWinogradDtypes);
  wino_cpu["isa"] = iddpm::cpu::winograd_isa();
  wino_cpu["packed"] = iddpm::cpu::winograd_packed_supported();
  winograd["cpu"] = wino_cpu;
  winograd["cuda"] = py::none();
  caps["winograd"] = winograd;
  py::dict attention_bf16, abf_cpu;
  abf_cpu["dtypes"] = dtype_names(iddpm::cpu::kAttentionBf16Dtypes);
  abf_cpu["head_dims"] = "any";
  abf_cpu["isa"] = iddpm::cpu::qkv_attention_bf16_isa();
  attention_bf16["cpu"] = abf_cpu;
  attention_bf16["cuda"] = py::none();
  caps["attention_bf16"] = attention_bf16;
  return caps;
}

}  // namespace

namespace iddpm::ops {
bool attention_sm90_enabled();          // csrc/ops/attention.cpp
bool set_attention_sm90(bool enabled);  // returns the previous value
bool attention_tile_major_enabled();
bool set_attention_tile_major(bool enabled);  // returns the previous value
bool attention_sm90_pipelined_enabled();
bool set_attention_sm90_pipelined(bool enabled);  // returns the previous value
bool attention_sm90_bulk_dq_enabled();
bool set_attention_sm90_bulk_dq(bool enabled);  // returns the previous value
int64_t attention_kernel_arch(int64_t device_index);
bool attention_fp32_tf32();
int64_t attention_smem_bytes(int64_t element_size, int64_t head_dim, bool backward);
}  // namespace iddpm::ops

PYBIND11_MODULE(_C, m) {
  m.doc() = "iddpm_ext compiled kernels (torch ops live under torch.ops.iddpm)";
  m.def("build_info", &build_info, "Facts about how this extension was built.");
  m.def("capabilities", &capabilities,
        "What the compiled kernels accept: ops, dtypes and head dims per device (a plain dict).");
  m.def("attention_sm90_enabled", &iddpm::ops::attention_sm90_enabled,
        "Whether the CUDA attention ops run their sm_90a kernels (forward and backward) where they "
        "can (process-wide).");
  m.def("set_attention_sm90", &iddpm::ops::set_attention_sm90, py::arg("enabled"),
        "Switch the sm_90a attention kernels on or off for the whole process; returns the "
        "previous value (initially: IDDPM_ATTENTION_SM90=1 in the environment at first use).");
  m.def("attention_tile_major_enabled", &iddpm::ops::attention_tile_major_enabled,
        "Whether the CUDA attention's sm_80 kernels launch a head's tiles adjacent "
        "(process-wide).");
  m.def("set_attention_tile_major", &iddpm::ops::set_attention_tile_major, py::arg("enabled"),
        "Switch the tile-major launch order of the CUDA attention's sm_80 kernels on or off for "
        "the whole process; returns the previous value (initially: IDDPM_ATTENTION_TILE_MAJOR=1 "
        "in the environment at first use).");
  m.def("attention_sm90_pipelined_enabled", &iddpm::ops::attention_sm90_pipelined_enabled,
        "Whether the sm_90a attention forward, where it runs, uses its pipelined consumers "
        "(process-wide).");
  m.def("set_attention_sm90_pipelined", &iddpm::ops::set_attention_sm90_pipelined,
        py::arg("enabled"),
        "Switch the sm_90a attention forward's pipelined consumers on or off for the whole "
        "process; returns the previous value (initially: IDDPM_ATTENTION_SM90_PIPELINED=1 in the "
        "environment at first use).");
  m.def("attention_sm90_bulk_dq_enabled", &iddpm::ops::attention_sm90_bulk_dq_enabled,
        "Whether the sm_90a attention backward, where it runs, adds dq by TMA bulk reductions "
        "instead of atomics (process-wide).");
  m.def("set_attention_sm90_bulk_dq", &iddpm::ops::set_attention_sm90_bulk_dq, py::arg("enabled"),
        "Switch the sm_90a attention backward's bulk dq reductions on or off for the whole "
        "process; returns the previous value (initially: IDDPM_ATTENTION_SM90_BULK_DQ=1 in the "
        "environment at first use).");
  m.def("attention_fp32_tf32", &iddpm::ops::attention_fp32_tf32,
        "Whether the fused CUDA attention runs fp32 products on TF32 tensor cores now (torch's "
        "torch.backends.cuda.matmul.fp32_precision == 'tf32', read as the op reads it at each "
        "call), else split-TF32.");
  m.def("attention_kernel_arch", &iddpm::ops::attention_kernel_arch, py::arg("device_index"),
        "The architecture (10·major + minor) the CUDA attention's code on this device was built "
        "for; the fused CUDA attention needs 80 or more (0: built without CUDA).");
  m.def("attention_smem_bytes", &iddpm::ops::attention_smem_bytes, py::arg("element_size"),
        py::arg("head_dim"), py::arg("backward"),
        "Shared memory per block (bytes) the CUDA attention forward or backward kernel needs for "
        "this element size (2: fp16/bf16, 4: fp32) and head dim (0: built without CUDA).");
  m.attr("__version__") = IDDPM_VERSION;
}

// python/module.cpp — the pybind11 module iddpm_ext._C: build facts and version.
// Importing it also registers the `iddpm` torch ops (schemas.cpp, csrc/ops).
// Always `import torch` before importing this module.
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifndef IDDPM_VERSION
#define IDDPM_VERSION "0.0.0+unknown"
#endif

namespace {

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
  d["compiler"] = IDDPM_COMPILER;
  d["build_type"] = IDDPM_BUILD_TYPE;
  d["cxx_standard"] = static_cast<long>(__cplusplus);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "iddpm_ext compiled kernels (torch ops live under torch.ops.iddpm)";
  m.def("build_info", &build_info, "Facts about how this extension was built.");
  m.attr("__version__") = IDDPM_VERSION;
}

// csrc/common/dtype.h — the one element-type enum of the kernels' params structs (step,
// attention), shared by the CPU and CUDA builds. The glue converts at::ScalarType to it in one
// place (csrc/ops/dtype.h); each kernel header lists the dtypes it accepts (kStepDtypes,
// cpu::kAttentionDtypes, cuda::kAttentionDtypes), which the glue's checks and
// python/module.cpp's capabilities() both read.
#pragma once

#include <cstdint>

namespace iddpm {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// torch's name of the dtype, as error messages and capabilities() spell it.
constexpr const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace iddpm

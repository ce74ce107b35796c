// csrc/ops/dtype.h — the glue's one conversion from at::ScalarType to the kernels' DType
// (common/dtype.h), and dtype checks against the lists of dtypes the kernels accept.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>
#include <string>

#include "common/dtype.h"
#include "ops/checks.h"

namespace iddpm::ops {

// The kernels' DType of a torch dtype; nullopt for one that no kernel has.
inline std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

// True when `t` is one of `dtypes`.
template <size_t N>
bool dtype_in(at::ScalarType t, const DType (&dtypes)[N]) {
  const std::optional<DType> d = to_dtype(t);
  for (const DType x : dtypes) {
    if (d == x) return true;
  }
  return false;
}

// "float32, float16 or bfloat16": a dtype list as the error messages name it.
template <size_t N>
std::string dtype_names(const DType (&dtypes)[N]) {
  return or_list(dtypes, [](DType d) { return std::string(dtype_name(d)); });
}

// torch's Python name of a tensor's dtype ("float32", "int64"), as the fake implementations' checks
// print it.
inline std::string torch_dtype_name(const at::Tensor& t) {
  return std::string(c10::getDtypeNames(t.scalar_type()).first);
}

// t has the dtype of `ref`: "<name>: expected dtype float32 (that of x), got bfloat16".
inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
                    torch_dtype_name(ref), " (that of ", ref_name, "), got ", torch_dtype_name(t));
}

// The DType of a tensor whose dtype the caller has checked against a kernel's list.
inline DType dtype_of(const at::Tensor& x) {
  const std::optional<DType> d = to_dtype(x.scalar_type());
  TORCH_CHECK(d.has_value(), "iddpm_ext internal error: no kernel dtype for ", x.scalar_type());
  return *d;
}

}  // namespace iddpm::ops

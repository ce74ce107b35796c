// csrc/ops/checks.h — argument checks shared by the op glue. Every failure names the
// argument and says what was expected and what was received; they raise ValueError
// in Python (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>

#include <cstddef>
#include <optional>
#include <string>

namespace iddpm::ops {

inline std::string shape_str(const at::Tensor& x) { return c10::str(x.sizes()); }

// "a, b or c": what is accepted, as the error messages list it (name(x) gives each item).
template <class T, size_t N, class Name>
std::string or_list(const T (&xs)[N], Name name) {
  std::string s;
  for (size_t i = 0; i < N; ++i) {
    if (i > 0) s += i + 1 < N ? ", " : " or ";
    s += name(xs[i]);
  }
  return s;
}

inline void check_defined(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.defined(), name, ": expected a tensor, got None");
}

inline void check_dim(const at::Tensor& x, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(x.dim() == dim, name, ": expected a ", dim, "-D tensor ", layout,
                    ", got shape ", shape_str(x));
}

inline void check_dtype(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(x.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                    x.scalar_type());
}

inline void check_index_dtype(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt, name,
                    ": expected an integer tensor (int64 or int32), got ", x.scalar_type());
}

// `bad`: what a CPU kernel returned for the [B] int64/int32 timesteps t of a table with T rows,
// -1 or the first b whose t[b] is outside [0, T) (then the error names it).
inline void check_timesteps(const at::Tensor& t, int64_t bad, int64_t T) {
  if (bad < 0) return;
  const int64_t value =
      t.scalar_type() == at::kLong ? t.data_ptr<int64_t>()[bad] : t.data_ptr<int32_t>()[bad];
  TORCH_CHECK_VALUE(false, "t: expected timesteps in [0, ", T, ") (the table has ", T,
                    " rows), got t[", bad, "] = ", value);
}

// a · b, or nullopt where the product does not fit in int64 (sizes and counts near 2^63 are
// valid arguments: a tensor may have such a dim when another is 0, num_heads is any int).
inline std::optional<int64_t> checked_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  if (c10::mul_overflows(a, b, &out)) return std::nullopt;
  return out;
}

// k · n as the error messages print it: its value, or "k·n" where that overflows int64.
inline std::string product_str(int64_t k, int64_t n) {
  const std::optional<int64_t> p = checked_mul(k, n);
  return p ? std::to_string(*p) : std::to_string(k) + "·" + std::to_string(n);
}

// x is a CPU tensor: "<name>: expected a CPU tensor (<op> has a CPU kernel only), got one on ...".
inline void check_cpu_only(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x.is_cpu(), name, ": expected a CPU tensor (", op,
                    " has a CPU kernel only), got one on ", x.device());
}

inline void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
                    " (the device of ", ref_name, "), got ", x.device());
}

}  // namespace iddpm::ops

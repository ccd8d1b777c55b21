// Argument checks shared by LayerNorm and RMSNorm on every backend, worded like torch.nn's.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace fusenorm {

struct RowShape {
  int64_t M;  // rows: product of the leading dims
  int64_t N;  // row length: product of normalized_shape
  std::vector<int64_t> stat_shape;  // leading dims of x
};

inline RowShape check_row_norm_args(const char* op, const at::Tensor& x, at::IntArrayRef normalized_shape,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
              "element, but got normalized_shape = ", normalized_shape);
  // torch.nn raises NotImplementedError for non-floating inputs; so do we.
  TORCH_CHECK_NOT_IMPLEMENTED(
      x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
          x.scalar_type() == at::kBFloat16,
      "\"", op, "\" not implemented for '", c10::toString(x.scalar_type()),
      "' (expected a float32, float64, float16 or bfloat16 input)");
  const int64_t d = x.dim();
  bool ok = d >= k;
  for (int64_t i = 0; ok && i < k; ++i) ok = x.size(d - k + i) == normalized_shape[i];
  TORCH_CHECK(ok, "Given normalized_shape=", normalized_shape, ", expected input with shape [*",
              [&] {
                std::string s;
                for (auto v : normalized_shape) s += ", " + std::to_string(v);
                return s;
              }(),
              "], but got input of size", x.sizes());
  auto check_param = [&](const std::optional<at::Tensor>& p, const char* name) {
    if (!p.has_value() || !p->defined()) return;
    TORCH_CHECK(p->sizes().equals(normalized_shape), "Expected ", name,
                " to be of same shape as normalized_shape, but got ", name, " of shape ", p->sizes(),
                " and normalized_shape = ", normalized_shape);
    TORCH_CHECK(p->device() == x.device(), op, ": expected ", name, " on ", x.device(), " like the input, got ",
                p->device());
    TORCH_CHECK(p->scalar_type() == x.scalar_type() ||
                    (p->scalar_type() == at::kFloat &&
                     (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)),
                op, ": mixed dtype: ", name, " is ", p->scalar_type(), " but the input is ", x.scalar_type(),
                "; parameters must match the input, or be float32 for a float16/bfloat16 input");
  };
  check_param(weight, "weight");
  check_param(bias, "bias");
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), op, ": weight (", weight->scalar_type(),
                ") and bias (", bias->scalar_type(), ") must have the same dtype");
  }
  RowShape s;
  s.N = 1;
  for (auto v : normalized_shape) s.N *= v;
  s.M = 1;
  for (int64_t i = 0; i < d - k; ++i) {
    s.M *= x.size(i);
    s.stat_shape.push_back(x.size(i));
  }
  return s;
}

inline at::ScalarType param_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
  if (weight.has_value() && weight->defined()) return weight->scalar_type();
  if (bias.has_value() && bias->defined()) return bias->scalar_type();
  return x.scalar_type();
}

inline at::ScalarType stat_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

}  // namespace fusenorm

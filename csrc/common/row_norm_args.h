// Argument checks shared by the norms on every backend, worded like torch.nn's.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace fusenorm {

struct RowShape {
  int64_t M;  // rows: product of the leading dims
  int64_t N;  // row length: product of normalized_shape
  std::vector<int64_t> stat_shape;  // leading dims of x
};

// "[4, 8]": for error messages (see row_norm_args.cpp for why not operator<<).
std::string shape_str(at::IntArrayRef sizes);

// grad_output of a backward op: x's sizes, a floating dtype (converted to x's).
void check_grad_output(const char* op, const at::Tensor& dy, const at::Tensor& x);

// t (same sizes as x) in xc's dtype and strides (xc: x in the layout the kernels index), copied
// only when they differ; name is t's name in the error messages.
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& xc, const char* op, const char* name);

// A statistic a backward op reads (mean, rstd): exactly `shape`, in the statistics dtype of x, on
// x's device; the kernels index it without bounds.
void check_saved_stat(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                      const at::Tensor& x);

// NotImplementedError, as torch.nn, for an input that is not fp32/fp64/fp16/bf16. Given weight and
// bias (LayerNorm, GroupNorm), one of another dtype than such a CPU input is a RuntimeError before
// that: torch's CPU kernels check "mixed dtype" first.
void check_input_dtype(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight = std::nullopt,
                       const std::optional<at::Tensor>& bias = std::nullopt);

// weight/bias on x's device, in x's dtype (or fp32 for a half input), the same dtype as each other.
void check_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias);

// Validates x / normalized_shape / weight / bias like torch.nn and returns the [M, N] view;
// layer_norm: LayerNorm's rules (check_input_dtype's for parameters, torch's LayerNorm wording of
// the shape message), else RMSNorm's.
// Defined once, in row_norm_args.cpp, for every backend.
RowShape check_row_norm_args(const char* op, const at::Tensor& x, at::IntArrayRef normalized_shape,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             bool layer_norm);

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

// A parameter's data as a contiguous array (kept alive by `keep`), or nullptr when absent.
template <typename P>
inline const P* param_ptr(const at::Tensor* t, at::Tensor& keep) {
  if (!t) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr<P>();
}

}  // namespace fusenorm

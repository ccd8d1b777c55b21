// Argument checks shared by the norms on every backend, worded like torch.nn's.
#include "common/row_norm_args.h"

#include <ATen/ops/empty_like.h>

#include <string>

namespace fusenorm {

// Sizes formatted as "[4, 8]" with std::to_string. Messages never stream integers through
// std::ostream: with a libstdc++ at run time older than the compiler's (seen on a GPU machine),
// the inlined numeric insertion crashes, and an error message must never crash.
std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

void check_grad_output(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": grad_output of size ", shape_str(dy.sizes()),
              " does not match input of size ", shape_str(x.sizes()));
  TORCH_CHECK(dy.is_floating_point(), op, ": grad_output must be a floating-point tensor, got ",
              c10::toString(dy.scalar_type()));
}

at::Tensor like_layout(const at::Tensor& t, const at::Tensor& xc, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == xc.sizes(), op, ": ", name, " of size ", shape_str(t.sizes()),
              " does not match input of size ", shape_str(xc.sizes()));
  TORCH_CHECK(t.device() == xc.device(), op, ": expected ", name, " on ", xc.device().str(), " like the input");
  at::Tensor u = t.scalar_type() == xc.scalar_type() ? t : t.to(xc.scalar_type());
  if (u.strides() == xc.strides()) return u;
  return at::empty_like(xc).copy_(u);
}

void check_saved_stat(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                      const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " of size ", shape_str(t.sizes()), " does not match the ",
              shape_str(shape), " its forward returns for this input");
  TORCH_CHECK(t.scalar_type() == stat_dtype(x.scalar_type()), op, ": ", name, " must be ",
              c10::toString(stat_dtype(x.scalar_type())), ", got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device().str(), ", the input on ",
              x.device().str());
}

void check_input_dtype(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias) {
  // torch compares the weight's dtype, or the bias's when there is no weight
  const at::Tensor* p = opt_ptr(weight) ? opt_ptr(weight) : opt_ptr(bias);
  TORCH_CHECK(!p || p->scalar_type() == x.scalar_type() || at::isFloatingType(x.scalar_type()) || !x.is_cpu(), op,
              ": mixed dtype: all inputs must share same datatype (the input is ", c10::toString(x.scalar_type()),
              ", a parameter ", c10::toString(p->scalar_type()), ")");
  // torch.nn raises NotImplementedError for non-floating inputs; so do we.
  TORCH_CHECK_NOT_IMPLEMENTED(
      x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
          x.scalar_type() == at::kBFloat16,
      "\"", op, "\" not implemented for '", c10::toString(x.scalar_type()),
      "' (expected a float32, float64, float16 or bfloat16 input)");
}

void check_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias) {
  for (int which = 0; which < 2; ++which) {
    const std::optional<at::Tensor>& p = which == 0 ? weight : bias;
    const char* name = which == 0 ? "weight" : "bias";
    if (!p.has_value() || !p->defined()) continue;
    TORCH_CHECK(p->device() == x.device(), op, ": expected ", name, " on ", x.device().str(), " like the input, got ",
                p->device().str());
    TORCH_CHECK(p->scalar_type() == x.scalar_type() ||
                    (p->scalar_type() == at::kFloat &&
                     (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)),
                op, ": mixed dtype: ", name, " is ", c10::toString(p->scalar_type()), " but the input is ",
                c10::toString(x.scalar_type()),
                "; parameters must match the input, or be float32 for a float16/bfloat16 input");
  }
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), op, ": weight (", c10::toString(weight->scalar_type()),
                ") and bias (", c10::toString(bias->scalar_type()), ") must have the same dtype");
  }
}

RowShape check_row_norm_args(const char* op, const at::Tensor& x, at::IntArrayRef normalized_shape,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             bool layer_norm) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  const std::string ns = shape_str(normalized_shape);
  TORCH_CHECK(k >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
              "element, but got normalized_shape = ", ns);
  const int64_t d = x.dim();
  bool ok = d >= k;
  for (int64_t i = 0; ok && i < k; ++i) ok = x.size(d - k + i) == normalized_shape[i];
  // "[*, 8, 8]" is ns = "[8, 8]" with "*, " after its bracket (k >= 1 here); torch's RMSNorm writes
  // "[*8, 8]"
  TORCH_CHECK(ok, "Given normalized_shape=", ns, ", expected input with shape ", layer_norm ? "[*, " : "[*",
              ns.substr(1), ", but got input of size", shape_str(x.sizes()));
  for (int which = 0; which < 2; ++which) {
    const std::optional<at::Tensor>& p = which == 0 ? weight : bias;
    const char* name = which == 0 ? "weight" : "bias";
    if (!p.has_value() || !p->defined()) continue;
    TORCH_CHECK(p->sizes().equals(normalized_shape), "Expected ", name,
                " to be of same shape as normalized_shape, but got ", name, " of shape ", shape_str(p->sizes()),
                " and normalized_shape = ", ns);
  }
  if (layer_norm) {
    check_input_dtype(op, x, weight, bias);
  } else {
    check_input_dtype(op, x);
  }
  check_params(op, x, weight, bias);
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

}  // namespace fusenorm

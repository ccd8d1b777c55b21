// BatchNorm argument checks (torch.batch_norm's wording) and layout, for every backend.
#include "common/batch_norm_ops.h"

namespace fusenorm {

Act parse_bn_activation(const std::string& name) {
  if (name == "none" || name.empty()) return Act::None;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK_VALUE(false, "fusenorm: batch_norm activation must be None or \"relu\", got \"", name, "\"");
}

BatchNormShape check_batch_norm_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of at least 2 dimensions [N, C, *], got ",
              std::to_string(x.dim()), "D input");
  check_input_dtype(op, x);
  BatchNormShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) s.S *= x.size(i);
  s.channels_last = x.is_contiguous() ? s.S == 1 : is_channels_last_like(x);
  return s;
}

void check_channel_vector(const at::Tensor& v, const char* name, int64_t C, const at::Tensor& x) {
  TORCH_CHECK(v.numel() == C, name, " should contain ", std::to_string(C), " elements not ",
              std::to_string(v.numel()));
  TORCH_CHECK(v.dim() == 1, name, " should be a 1-D tensor of ", std::to_string(C), " elements, got size ",
              shape_str(v.sizes()));
  TORCH_CHECK(v.device() == x.device(), "fusenorm.batch_norm: expected ", name, " on ", x.device().str(),
              " like the input, got ", v.device().str());
}

void check_bn_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, int64_t C) {
  check_params(op, x, weight, bias);
  if (opt_ptr(weight)) check_channel_vector(*weight, "weight", C, x);
  if (opt_ptr(bias)) check_channel_vector(*bias, "bias", C, x);
}

at::Tensor batch_norm_input(const at::Tensor& x, const BatchNormShape& s) {
  if (x.is_contiguous()) return x;
  return s.channels_last ? x : x.contiguous();
}

}  // namespace fusenorm

// GroupNorm argument checks (torch.group_norm's, same wording) and layout, for every backend.
#include <vector>

#include "common/group_norm_ops.h"

namespace fusenorm {

Act parse_activation(const std::string& name) {
  if (name == "none" || name.empty()) return Act::None;
  if (name == "silu") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK_VALUE(false, "fusenorm: activation must be None, \"silu\", \"gelu\" or \"relu\", got \"", name, "\"");
}

bool is_channels_last_like(const at::Tensor& x) {
  if (x.dim() < 3) return false;
  std::vector<int64_t> perm{0};
  for (int64_t i = 2; i < x.dim(); ++i) perm.push_back(i);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

GroupNormShape check_group_norm_args(const char* op, const at::Tensor& x, int64_t num_groups,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ", std::to_string(x.dim()));
  TORCH_CHECK(num_groups > 0, "Expected num groups to be greater than 0, got ", std::to_string(num_groups));
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0, "Expected number of channels to be greater than 0, got 0");
  TORCH_CHECK(C % num_groups == 0, "Expected number of channels in input to be divisible by num_groups, but got input "
              "of shape ", shape_str(x.sizes()), " and num_groups=", std::to_string(num_groups));
  for (int which = 0; which < 2; ++which) {
    const std::optional<at::Tensor>& p = which == 0 ? weight : bias;
    const char* name = which == 0 ? "weight" : "bias";
    if (!p.has_value() || !p->defined()) continue;
    TORCH_CHECK(p->dim() == 1 && p->numel() == C, "Expected ", name, " to be a vector of size equal to the number of ",
                "channels in input, but got ", name, " of shape ", shape_str(p->sizes()), " and input of shape ",
                shape_str(x.sizes()));
  }
  check_input_dtype(op, x, weight, bias);
  check_params(op, x, weight, bias);
  GroupNormShape s;
  s.N = x.size(0);
  s.C = C;
  s.G = num_groups;
  s.S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) s.S *= x.size(i);
  s.channels_last = !x.is_contiguous() && is_channels_last_like(x);
  return s;
}

at::Tensor group_norm_input(const at::Tensor& x, const GroupNormShape& s) {
  return (s.channels_last || x.is_contiguous()) ? x : x.contiguous();
}

}  // namespace fusenorm

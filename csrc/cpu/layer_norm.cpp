// fusenorm::layer_norm_fwd / layer_norm_bwd on CPU. Kernels: row_norm.h (shared with RMSNorm).
#include <torch/library.h>

#include "cpu/row_norm.h"

namespace fusenorm::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  return row_norm_forward<false>("fusenorm.layer_norm", x, normalized_shape, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              at::IntArrayRef normalized_shape,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              std::array<bool, 3> mask) {
  return row_norm_backward<false>("fusenorm.layer_norm", dy, x, &mean, rstd, normalized_shape, weight, bias,
                                  mask[0], mask[1], mask[2]);
}

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  m.impl("layer_norm_fwd", &fusenorm::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fusenorm::cpu::layer_norm_bwd);
}

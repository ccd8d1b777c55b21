// fusenorm::rms_norm_fwd / rms_norm_bwd on CPU. Kernels: row_norm.h (shared with LayerNorm).
#include <torch/library.h>

#include "cpu/row_norm.h"

namespace fusenorm::cpu {

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape,
                                                const std::optional<at::Tensor>& weight, double eps) {
  auto [y, mean, rstd] = row_norm_forward<true>("fusenorm.rms_norm", x, normalized_shape, weight, std::nullopt, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                                at::IntArrayRef normalized_shape,
                                                const std::optional<at::Tensor>& weight, std::array<bool, 2> mask) {
  auto [dx, dw, db] = row_norm_backward<true>("fusenorm.rms_norm", dy, x, nullptr, rstd, normalized_shape, weight,
                                              std::nullopt, mask[0], mask[1], false);
  return {dx, dw};
}

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  m.impl("rms_norm_fwd", &fusenorm::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fusenorm::cpu::rms_norm_bwd);
}

// fusenorm::layer_norm_fwd / layer_norm_bwd on CUDA. Kernels: row_norm.cuh (shared with RMSNorm).
#include <torch/library.h>

#include "cuda/row_norm.cuh"

namespace fusenorm::cuda {

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

}  // namespace fusenorm::cuda

TORCH_LIBRARY_IMPL(fusenorm, CUDA, m) {
  m.impl("layer_norm_fwd", &fusenorm::cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fusenorm::cuda::layer_norm_bwd);
}

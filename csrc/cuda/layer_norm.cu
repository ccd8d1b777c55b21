// fusenorm::layer_norm_fwd / layer_norm_bwd on CUDA. Kernels: cuda/row_norm.cuh (shared by the row norms);
// the op wrappers: common/row_norm_ops.h.
#include <torch/library.h>

#include "cuda/row_norm.cuh"

TORCH_LIBRARY_IMPL(fusenorm, CUDA, m) {
  using Ops = fusenorm::RowNormOps<fusenorm::cuda::Backend>;
  m.impl("layer_norm_fwd", &Ops::layer_norm_fwd);
  m.impl("layer_norm_bwd", &Ops::layer_norm_bwd);
}

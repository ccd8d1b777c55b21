// fusenorm::rms_norm_fwd / rms_norm_bwd on CUDA. Kernels: cuda/row_norm.cuh (shared by the row norms);
// the op wrappers: common/row_norm_ops.h.
#include <torch/library.h>

#include "cuda/row_norm.cuh"

TORCH_LIBRARY_IMPL(fusenorm, CUDA, m) {
  using Ops = fusenorm::RowNormOps<fusenorm::cuda::Backend>;
  m.impl("rms_norm_fwd", &Ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &Ops::rms_norm_bwd);
}

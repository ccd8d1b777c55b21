// fusenorm::group_norm_fwd / group_norm_bwd on CUDA. Kernels: cuda/group_norm.cuh;
// the op wrappers: common/group_norm_ops.h.
#include <torch/library.h>

#include "cuda/group_norm.cuh"

TORCH_LIBRARY_IMPL(fusenorm, CUDA, m) {
  using Ops = fusenorm::GroupNormOps<fusenorm::cuda::GroupNormBackend>;
  m.impl("group_norm_fwd", &Ops::group_norm_fwd);
  m.impl("group_norm_bwd", &Ops::group_norm_bwd);
}

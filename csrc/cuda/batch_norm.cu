// fusenorm::batch_norm_* on CUDA. Kernels: cuda/batch_norm.cuh; the op wrappers:
// common/batch_norm_ops.h.
#include <torch/library.h>

#include "cuda/batch_norm.cuh"

TORCH_LIBRARY_IMPL(fusenorm, CUDA, m) {
  using Ops = fusenorm::BatchNormOps<fusenorm::cuda::BatchNormBackend>;
  m.impl("batch_norm_fwd", &Ops::batch_norm_fwd);
  m.impl("batch_norm_stats", &Ops::batch_norm_stats);
  m.impl("batch_norm_apply", &Ops::batch_norm_apply);
  m.impl("batch_norm_bwd", &Ops::batch_norm_bwd);
  m.impl("batch_norm_bwd_reduce", &Ops::batch_norm_bwd_reduce);
  m.impl("batch_norm_bwd_elemt", &Ops::batch_norm_bwd_elemt);
}

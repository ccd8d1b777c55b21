// fusenorm_simt::batch_norm_*: the CUDA BatchNorm kernels, emulated.
#include "cuda/batch_norm.cuh"
#include "simt_lib.h"

FUSENORM_SIMT_FRAGMENT(FUSENORM_SIMT_NS, m) {
  using Ops = fusenorm::BatchNormOps<fusenorm::cuda::BatchNormBackend>;
  m.def("batch_norm_fwd", &Ops::batch_norm_fwd);
  m.def("batch_norm_stats", &Ops::batch_norm_stats);
  m.def("batch_norm_apply", &Ops::batch_norm_apply);
  m.def("batch_norm_bwd", &Ops::batch_norm_bwd);
  m.def("batch_norm_bwd_reduce", &Ops::batch_norm_bwd_reduce);
  m.def("batch_norm_bwd_elemt", &Ops::batch_norm_bwd_elemt);
}

// fusenorm_simt::group_norm_fwd / group_norm_bwd: the CUDA GroupNorm kernels, emulated.
#include "cuda/group_norm.cuh"
#include "simt_lib.h"

FUSENORM_SIMT_FRAGMENT(FUSENORM_SIMT_NS, m) {
  using Ops = fusenorm::GroupNormOps<fusenorm::cuda::GroupNormBackend>;
  m.def("group_norm_fwd", &Ops::group_norm_fwd);
  m.def("group_norm_bwd", &Ops::group_norm_bwd);
}

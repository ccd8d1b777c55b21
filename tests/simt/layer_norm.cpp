// fusenorm_simt::layer_norm_fwd / layer_norm_bwd: the CUDA LayerNorm kernels, emulated.
#include "simt_lib.h"

FUSENORM_SIMT_FRAGMENT(FUSENORM_SIMT_NS, m) {
  m.def("layer_norm_fwd", &SimtOps::layer_norm_fwd);
  m.def("layer_norm_bwd", &SimtOps::layer_norm_bwd);
}

// fusenorm_simt::rms_norm_fwd / rms_norm_bwd: the CUDA RMSNorm kernels, emulated.
#include "simt_lib.h"

FUSENORM_SIMT_FRAGMENT(FUSENORM_SIMT_NS, m) {
  m.def("rms_norm_fwd", &SimtOps::rms_norm_fwd);
  m.def("rms_norm_bwd", &SimtOps::rms_norm_bwd);
}

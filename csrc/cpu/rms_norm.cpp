// fusenorm::rms_norm_fwd / rms_norm_bwd on CPU. Kernels: cpu/row_norm.h (shared by the row norms);
// the op wrappers: common/row_norm_ops.h.
#include <torch/library.h>

#include "cpu/row_norm.h"

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  using Ops = fusenorm::RowNormOps<fusenorm::cpu::Backend>;
  m.impl("rms_norm_fwd", &Ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &Ops::rms_norm_bwd);
}

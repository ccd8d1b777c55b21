// fusenorm::layer_norm_fwd / layer_norm_bwd on CPU. Kernels: cpu/row_norm.h (shared by the row norms);
// the op wrappers: common/row_norm_ops.h.
#include <torch/library.h>

#include "cpu/row_norm.h"

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  using Ops = fusenorm::RowNormOps<fusenorm::cpu::Backend>;
  m.impl("layer_norm_fwd", &Ops::layer_norm_fwd);
  m.impl("layer_norm_bwd", &Ops::layer_norm_bwd);
}

// A planted-bug build (FUSENORM_PLANT_BUG = n, see common/simt.cuh): the LayerNorm forward kernels
// in fp32 only, which is all a planted bug needs and keeps each build short.
#include <ATen/ops/empty_like.h>

#include "simt_lib.h"

#if !FUSENORM_PLANT_BUG
#error "planted.cpp is built with -DFUSENORM_PLANT_BUG=n"
#endif

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                                              const at::Tensor& b, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "planted layer_norm_fwd: fp32 [M, N] input");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty_like(xc), mean = at::empty({M}, x.options()), rstd = at::empty({M}, x.options());
  fusenorm::cuda::launch_fwd<float, float, false>(xc.data_ptr<float>(), y.data_ptr<float>(), wc.data_ptr<float>(),
                                                  bc.data_ptr<float>(), mean.data_ptr<float>(),
                                                  rstd.data_ptr<float>(), M, N, eps, 0, nullptr);
  return {y, mean, rstd};
}

}  // namespace

FUSENORM_SIMT_LIBRARY(FUSENORM_SIMT_NS, m) {
  FUSENORM_SIMT_CONTROLS(m);
  m.def("layer_norm_fwd", &layer_norm_fwd);
}

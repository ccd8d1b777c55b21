// The activations a norm can apply to its affine output in the same pass (GroupNorm's
// activation=...), and their derivatives for the backward, in the accumulation type.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>

#include "common/group_norm_ops.h"

namespace fusenorm {

C10_HOST_DEVICE inline float act_exp(float v) { return expf(v); }
C10_HOST_DEVICE inline double act_exp(double v) { return exp(v); }
C10_HOST_DEVICE inline float act_erf(float v) { return erff(v); }
C10_HOST_DEVICE inline double act_erf(double v) { return erf(v); }

// SiLU, z / (1 + exp(-z)). On a CUDA device, fp32 uses the hardware exp2 and reciprocal (about two
// instructions each, where expf and an IEEE division take about ten each): with the standard ones,
// the forward kernels of half types were bound by instruction issue, not memory. __expf's error is
// about 2 + 1.2 * |z| ulp of exp(-z), so SiLU's relative error stays near 1e-6 for |z| < 10 and only
// the tiny outputs of very negative z see tens of ulp; __fdividef gives 0 for z in about
// (-88.7, -87.3), where SiLU is below 1e-36. The backward (activate_backward) keeps expf.
C10_HOST_DEVICE inline float act_silu(float z) {
#ifdef __CUDA_ARCH__
  return __fdividef(z, 1.0f + __expf(-z));
#else
  return z / (1.0f + expf(-z));
#endif
}
C10_HOST_DEVICE inline double act_silu(double z) { return z / (1.0 + exp(-z)); }

template <typename A>
C10_HOST_DEVICE inline A activate(Act act, A z) {
  switch (act) {
    case Act::Silu: return act_silu(z);
    case Act::Gelu: return A(0.5) * z * (A(1) + act_erf(z * A(0.70710678118654752440)));  // exact (erf) GELU
    case Act::Relu: return z < A(0) ? A(0) : z;  // NaN stays NaN, as torch.relu
    default: return z;
  }
}

// The upstream gradient d through the activation at z: d * act'(z). ReLU passes d or 0, never
// d * 0, so that a non-finite d where z <= 0 gives 0 as torch's threshold_backward does.
template <typename A>
C10_HOST_DEVICE inline A activate_backward(Act act, A z, A d) {
  switch (act) {
    case Act::Silu: {
      const A s = A(1) / (A(1) + act_exp(-z));
      return d * (s * (A(1) + z * (A(1) - s)));
    }
    case Act::Gelu:
      return d * (A(0.5) * (A(1) + act_erf(z * A(0.70710678118654752440))) +
                  z * A(0.39894228040143267794) * act_exp(A(-0.5) * z * z));
    case Act::Relu: return z <= A(0) ? A(0) : d;  // NaN z passes d, as torch's threshold_backward
    default: return d;
  }
}

}  // namespace fusenorm

// Dtype dispatch for the norms: (input dtype, parameter dtype) -> (scalar_t, param_t).
// Parameters share the input's dtype, except that half/bfloat16 inputs may come with fp32
// parameters (mixed precision, as torch.nn allows on CPU and CUDA).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#define FUSENORM_PARAM_CASE(XT, scalar_type, param_type, ...) \
  case XT: {                                                  \
    using scalar_t = scalar_type;                             \
    using param_t = param_type;                               \
    return __VA_ARGS__();                                     \
  }

#define FUSENORM_DISPATCH(XTYPE, WTYPE, NAME, ...)                                              \
  [&] {                                                                                       \
    const bool _fp32_params = (WTYPE) == at::kFloat;                                          \
    switch (XTYPE) {                                                                          \
      FUSENORM_PARAM_CASE(at::kFloat, float, float, __VA_ARGS__)                              \
      FUSENORM_PARAM_CASE(at::kDouble, double, double, __VA_ARGS__)                           \
      case at::kHalf:                                                                         \
        if (_fp32_params) {                                                                   \
          using scalar_t = at::Half;                                                          \
          using param_t = float;                                                              \
          return __VA_ARGS__();                                                               \
        } else {                                                                              \
          using scalar_t = at::Half;                                                          \
          using param_t = at::Half;                                                           \
          return __VA_ARGS__();                                                               \
        }                                                                                     \
      case at::kBFloat16:                                                                     \
        if (_fp32_params) {                                                                   \
          using scalar_t = at::BFloat16;                                                      \
          using param_t = float;                                                              \
          return __VA_ARGS__();                                                               \
        } else {                                                                              \
          using scalar_t = at::BFloat16;                                                      \
          using param_t = at::BFloat16;                                                       \
          return __VA_ARGS__();                                                               \
        }                                                                                     \
      default:                                                                                \
        TORCH_CHECK(false, NAME, ": expected a floating-point input, but got ", c10::toString(XTYPE)); \
    }                                                                                         \
  }()

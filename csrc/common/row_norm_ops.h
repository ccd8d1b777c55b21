// The LayerNorm / RMSNorm ops, shared by every backend: argument checks, output allocation,
// empty inputs and dtype dispatch. A backend supplies the kernels:
//   struct Backend {
//     struct Guard { explicit Guard(const at::Tensor& x); };   // device guard (CPU: nothing)
//     template <typename T, typename W, bool RMS> static void fwd(x, w, b, M, N, eps, y, mean, rstd);
//     template <typename T, typename W, bool RMS> static void bwd(dy, x, mean, rstd, w, M, N,
//                                                                want_dx, want_dw, want_db, dx, dw, db);
//   };
// and registers RowNormOps<Backend>::layer_norm_fwd etc. for its dispatch key.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <cmath>
#include <tuple>

#include "common/dispatch.h"
#include "common/row_norm_args.h"

namespace fusenorm {

template <typename Backend>
struct RowNormOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  template <bool RMS>
  static std::tuple<Tensor, Tensor, Tensor> forward(const char* op, const Tensor& x, at::IntArrayRef normalized_shape,
                                                    const OptTensor& weight, const OptTensor& bias, double eps) {
    RowShape s = check_row_norm_args(op, x, normalized_shape, weight, bias, !RMS);
    typename Backend::Guard guard(x);
    Tensor xc = x.contiguous();
    Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
    Tensor mean = RMS ? Tensor() : at::empty(s.stat_shape, sopt);
    Tensor rstd = at::empty(s.stat_shape, sopt);
    if (s.M > 0 && s.N > 0) {
      FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), op, [&] {
        Backend::template fwd<scalar_t, param_t, RMS>(xc, opt_ptr(weight), opt_ptr(bias), s.M, s.N, eps, y,
                                                      RMS ? nullptr : &mean, rstd);
      });
    } else if (s.M > 0) {  // empty rows: variance 0
      if (!RMS) mean.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    return {y, mean, rstd};
  }

  template <bool RMS>
  static std::tuple<Tensor, Tensor, Tensor> backward(const char* op, const Tensor& dy, const Tensor& x,
                                                     const Tensor* mean, const Tensor& rstd,
                                                     at::IntArrayRef normalized_shape, const OptTensor& weight,
                                                     const OptTensor& bias, bool want_dx, bool want_dw, bool want_db) {
    RowShape s = check_row_norm_args(op, x, normalized_shape, weight, bias, !RMS);
    check_grad_output(op, dy, x);
    if (mean) check_saved_stat(op, "mean", *mean, s.stat_shape, x);
    check_saved_stat(op, "rstd", rstd, s.stat_shape, x);
    typename Backend::Guard guard(x);
    want_dw = want_dw && opt_ptr(weight);
    want_db = want_db && opt_ptr(bias);
    Tensor xc = x.contiguous(), dyc = dy.to(x.scalar_type()).contiguous();
    Tensor dx = want_dx ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                        : at::empty({0}, x.options());
    Tensor dw = want_dw ? at::empty(weight->sizes(), weight->options()) : at::empty({0}, x.options());
    Tensor db = want_db ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, x.options());
    if (s.M == 0 || s.N == 0) {
      if (want_dw) dw.zero_();
      if (want_db) db.zero_();
      return {dx, dw, db};
    }
    if (!want_dx && !want_dw && !want_db) return {dx, dw, db};
    Tensor meanc = mean ? mean->contiguous() : Tensor();
    Tensor rstdc = rstd.contiguous();
    FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), op, [&] {
      Backend::template bwd<scalar_t, param_t, RMS>(dyc, xc, mean ? &meanc : nullptr, rstdc, opt_ptr(weight), s.M,
                                                    s.N, want_dx, want_dw, want_db, dx, dw, db);
    });
    return {dx, dw, db};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, at::IntArrayRef normalized_shape,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           double eps) {
    return forward<false>("fusenorm.layer_norm", x, normalized_shape, weight, bias, eps);
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                           const Tensor& rstd, at::IntArrayRef normalized_shape,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           std::array<bool, 3> mask) {
    return backward<false>("fusenorm.layer_norm", dy, x, &mean, rstd, normalized_shape, weight, bias, mask[0],
                           mask[1], mask[2]);
  }

  static std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, at::IntArrayRef normalized_shape,
                                                 const OptTensor& weight, double eps) {
    auto [y, mean, rstd] = forward<true>("fusenorm.rms_norm", x, normalized_shape, weight, std::nullopt, eps);
    return {y, rstd};
  }

  static std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& rstd,
                                                 at::IntArrayRef normalized_shape, const OptTensor& weight,
                                                 std::array<bool, 2> mask) {
    auto [dx, dw, db] = backward<true>("fusenorm.rms_norm", dy, x, nullptr, rstd, normalized_shape, weight,
                                       std::nullopt, mask[0], mask[1], false);
    return {dx, dw};
  }
};

}  // namespace fusenorm

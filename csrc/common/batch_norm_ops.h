// The BatchNorm ops, shared by every backend: argument checks (torch.nn's wording), the memory
// layout, output allocation, empty inputs and dtype dispatch.
//
// x: [N, C, *spatial] with S = prod(spatial), statistics per channel over N * S values, computed
// in place in either layout:
//   NCS  contiguous with S > 1: channel c is N runs of S contiguous values;
//   NSC  channels last (NHWC / NDHWC, any [N, C, *] stored as [N, *, C]), or any contiguous input
//        with S == 1 ([N, C]): N * S rows of C contiguous channels.
// Any other strides are made contiguous first; outputs keep the layout computed in.
//
// The ops mutate nothing: running statistics are updated by the caller from the (mean, var) that
// batch_norm_stats returns, so torch.compile keeps every op. Forward = stats + apply (training)
// or apply alone with the running statistics (eval); SyncBatchNorm merges the ranks' stats between
// the two, and reduces bwd_reduce's sums across ranks before bwd_elemt.
//
// A backend supplies (A = acc_t<T>; xc: the input tensor, for its device; pointers to [C] arrays;
// y, z, dz, dx, sum_g, sum_gx may be null):
//   stats<T>(s, xc, x, mean, var)                                biased variance
//   apply<T, W>(s, xc, x, mean, var, w, b, z, eps, act, y)       y = act((x - mean) * rstd * w + b + z)
//   fwd_train<T, W>(s, xc, x, w, b, z, eps, act, y, mean, var)   stats, then apply (fused where it can)
//   bwd_reduce<T>(s, xc, dy, x, y, mean, var, eps, act, sum_g, sum_gx)
//        g = dy masked by y > 0 (ReLU); sum_g = sum g, sum_gx = sum g * xhat
//   bwd_elemt<T, W>(s, xc, dy, x, y, mean, var, w, eps, act, k_g, k_gx, k, dx, dz)
//        dx = w * rstd * (g - k * k_g[c] - xhat * k * k_gx[c]) (k_g null: eval, dx = w * rstd * g);
//        dz = g
//   bwd<T, W>(s, xc, dy, x, y, mean, var, w, eps, act, training, sum_g, sum_gx, dx, dz)
//        bwd_reduce (when sum_g) then bwd_elemt with k = 1 / count (fused where it can)
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <string>
#include <tuple>

#include "common/dispatch.h"
#include "common/group_norm_ops.h"
#include "common/row_norm_args.h"
#include "common/welford.h"

namespace fusenorm {

struct BatchNormShape {
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;  // NSC
  int64_t count() const { return N * S; }
  int64_t numel() const { return N * C * S; }
};

// torch.batch_norm's checks on x (rank >= 2, dtype); the layout.
BatchNormShape check_batch_norm_input(const char* op, const at::Tensor& x);
// A per-channel vector of C values ("running_mean should contain 3 elements not 4").
void check_channel_vector(const at::Tensor& v, const char* name, int64_t C, const at::Tensor& x);
// check_params, and weight / bias of C values.
void check_bn_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, int64_t C);
// x itself when its layout is NCS or NSC, else a contiguous copy.
at::Tensor batch_norm_input(const at::Tensor& x, const BatchNormShape& s);
// ReLU or nothing: the BatchNorm epilogues.
Act parse_bn_activation(const std::string& name);

// The two-step forms of fwd_train and bwd, for backends (or layouts) that do not fuse them.
template <typename Backend, typename T, typename W>
void compose_fwd_train(const BatchNormShape& s, const at::Tensor& xc, const T* x, const W* w, const W* b, const T* z,
                       acc_t<T> eps, Act act, T* y, acc_t<T>* mean, acc_t<T>* var) {
  Backend::template stats<T>(s, xc, x, mean, var);
  Backend::template apply<T, W>(s, xc, x, mean, var, w, b, z, eps, act, y);
}

template <typename Backend, typename T, typename W>
void compose_bwd(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                 const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act act, bool training,
                 acc_t<T>* sum_g, acc_t<T>* sum_gx, T* dx, T* dz) {
  using A = acc_t<T>;
  if (sum_g) Backend::template bwd_reduce<T>(s, xc, dy, x, y, mean, var, eps, act, sum_g, sum_gx);
  if (dx || dz)
    Backend::template bwd_elemt<T, W>(s, xc, dy, x, y, mean, var, w, eps, act, training ? sum_g : nullptr,
                                      training ? sum_gx : nullptr, A(1) / static_cast<A>(s.count()), dx, dz);
}

template <typename Backend>
struct BatchNormOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  static constexpr const char* kOp = "fusenorm.batch_norm";

  // A statistics vector in the accumulation dtype, contiguous.
  static Tensor acc_vector(const Tensor& v, const Tensor& x, const char* name, int64_t C) {
    check_channel_vector(v, name, C, x);
    return v.to(stat_dtype(x.scalar_type())).contiguous();
  }

  static std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& x) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    typename Backend::Guard guard(x);
    auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
    Tensor mean = at::empty({s.C}, sopt), var = at::empty({s.C}, sopt);
    if (s.numel() == 0) {  // no values (or no channels): torch leaves the running statistics as they are
      mean.zero_();
      var.zero_();
      return {mean, var};
    }
    Tensor xc = batch_norm_input(x, s);
    FUSENORM_DISPATCH(x.scalar_type(), x.scalar_type(), kOp, [&] {
      using A = acc_t<scalar_t>;
      Backend::template stats<scalar_t>(s, xc, xc.data_ptr<scalar_t>(), mean.data_ptr<A>(), var.data_ptr<A>());
    });
    return {mean, var};
  }

  static Tensor batch_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                 const OptTensor& bias, const OptTensor& residual, double eps,
                                 const std::string& activation) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    const Act act = parse_bn_activation(activation);
    check_bn_params(kOp, x, weight, bias, s.C);
    typename Backend::Guard guard(x);
    Tensor m = acc_vector(mean, x, "running_mean", s.C), v = acc_vector(var, x, "running_var", s.C);
    Tensor xc = batch_norm_input(x, s);
    Tensor zc = opt_ptr(residual) ? like_layout(*residual, xc, kOp, "residual") : Tensor();
    Tensor y = at::empty_like(xc);
    if (s.numel() == 0) return y;
    FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), kOp, [&] {
      using A = acc_t<scalar_t>;
      Tensor wk, bk;
      Backend::template apply<scalar_t, param_t>(
          s, xc, xc.data_ptr<scalar_t>(), m.data_ptr<A>(), v.data_ptr<A>(), param_ptr<param_t>(opt_ptr(weight), wk),
          param_ptr<param_t>(opt_ptr(bias), bk), zc.defined() ? zc.data_ptr<scalar_t>() : nullptr,
          static_cast<A>(eps), act, y.data_ptr<scalar_t>());
    });
    return y;
  }

  // Training forward: batch statistics and y in one op.
  static std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                          const OptTensor& bias, const OptTensor& residual, double eps,
                                                          const std::string& activation) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    const Act act = parse_bn_activation(activation);
    check_bn_params(kOp, x, weight, bias, s.C);
    typename Backend::Guard guard(x);
    Tensor xc = batch_norm_input(x, s);
    Tensor zc = opt_ptr(residual) ? like_layout(*residual, xc, kOp, "residual") : Tensor();
    Tensor y = at::empty_like(xc);
    auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
    Tensor mean = at::empty({s.C}, sopt), var = at::empty({s.C}, sopt);
    if (s.numel() == 0) {  // no values (or no channels): zeros, as batch_norm_stats
      mean.zero_();
      var.zero_();
      return {y, mean, var};
    }
    FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), kOp, [&] {
      using A = acc_t<scalar_t>;
      Tensor wk, bk;
      Backend::template fwd_train<scalar_t, param_t>(
          s, xc, xc.data_ptr<scalar_t>(), param_ptr<param_t>(opt_ptr(weight), wk),
          param_ptr<param_t>(opt_ptr(bias), bk), zc.defined() ? zc.data_ptr<scalar_t>() : nullptr,
          static_cast<A>(eps), act, y.data_ptr<scalar_t>(), mean.data_ptr<A>(), var.data_ptr<A>());
    });
    return {y, mean, var};
  }

  // The reduction half of the backward: per-channel sums of g and g * xhat, in fp32 (fp64).
  static std::tuple<Tensor, Tensor> reduce(const BatchNormShape& s, const Tensor& dyc, const Tensor& xc,
                                           const Tensor& yc, const Tensor& m, const Tensor& v, double eps, Act act) {
    auto sopt = m.options();
    Tensor sum_g = at::empty({s.C}, sopt), sum_gx = at::empty({s.C}, sopt);
    if (s.numel() == 0) {
      sum_g.zero_();
      sum_gx.zero_();
      return {sum_g, sum_gx};
    }
    FUSENORM_DISPATCH(xc.scalar_type(), xc.scalar_type(), kOp, [&] {
      using A = acc_t<scalar_t>;
      Backend::template bwd_reduce<scalar_t>(s, xc, dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                             yc.defined() ? yc.data_ptr<scalar_t>() : nullptr, m.data_ptr<A>(),
                                             v.data_ptr<A>(), static_cast<A>(eps), act, sum_g.data_ptr<A>(),
                                             sum_gx.data_ptr<A>());
    });
    return {sum_g, sum_gx};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_bwd(const Tensor& dy, const Tensor& x,
                                                                   const Tensor& mean, const Tensor& var,
                                                                   const OptTensor& weight, const OptTensor& y,
                                                                   double eps, bool training,
                                                                   const std::string& activation,
                                                                   std::array<bool, 4> mask) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    const Act act = parse_bn_activation(activation);
    check_bn_params(kOp, x, weight, std::nullopt, s.C);
    check_grad_output(kOp, dy, x);
    TORCH_CHECK(act == Act::None || opt_ptr(y), kOp, ": the ReLU backward needs the forward output y");
    typename Backend::Guard guard(x);
    Tensor m = acc_vector(mean, x, "mean", s.C), v = acc_vector(var, x, "var", s.C);
    Tensor xc = batch_norm_input(x, s);
    Tensor dyc = like_layout(dy, xc, kOp, "grad_output");
    Tensor yc = act == Act::Relu ? like_layout(*y, xc, kOp, "y") : Tensor();
    const bool want_dz = mask[3] && act == Act::Relu;
    Tensor dx = mask[0] ? at::empty_like(xc) : at::empty({0}, x.options());
    Tensor dz = want_dz ? at::empty_like(xc) : at::empty({0}, x.options());
    Tensor dw = at::empty({0}, x.options()), db = at::empty({0}, x.options());
    const bool want_sums = mask[1] || mask[2] || (mask[0] && training);
    auto sopt = m.options();
    Tensor sum_g = at::empty({want_sums ? s.C : 0}, sopt), sum_gx = at::empty({want_sums ? s.C : 0}, sopt);
    if (s.numel() == 0) {  // no values (or no channels): the sums are 0
      sum_g.zero_();
      sum_gx.zero_();
    }
    if (s.numel() > 0 && (want_sums || mask[0] || want_dz)) {
      FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, std::nullopt), kOp, [&] {
        using A = acc_t<scalar_t>;
        Tensor wk;
        Backend::template bwd<scalar_t, param_t>(
            s, xc, dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), yc.defined() ? yc.data_ptr<scalar_t>() : nullptr,
            m.data_ptr<A>(), v.data_ptr<A>(), param_ptr<param_t>(opt_ptr(weight), wk), static_cast<A>(eps), act,
            training, want_sums ? sum_g.data_ptr<A>() : nullptr, want_sums ? sum_gx.data_ptr<A>() : nullptr,
            mask[0] ? dx.data_ptr<scalar_t>() : nullptr, want_dz ? dz.data_ptr<scalar_t>() : nullptr);
      });
    }
    if (mask[1] && opt_ptr(weight)) dw = sum_gx.to(weight->scalar_type());  // the sums themselves for an fp32 weight
    // dbias: the weight's dtype, else the fp32 sums themselves (a half x with an fp32 bias and no
    // weight got its dbias rounded to x's dtype first)
    if (mask[2]) db = opt_ptr(weight) ? sum_g.to(weight->scalar_type()) : sum_g;
    return {dx, dw, db, dz};
  }

  static void elemt(const BatchNormShape& s, const Tensor& dyc, const Tensor& xc, const Tensor& yc, const Tensor& m,
                    const Tensor& v, const OptTensor& weight, double eps, Act act, const Tensor* k_g,
                    const Tensor* k_gx, double k_scale, Tensor* dx, Tensor* dz) {
    FUSENORM_DISPATCH(xc.scalar_type(), param_dtype(xc, weight, std::nullopt), kOp, [&] {
      using A = acc_t<scalar_t>;
      Tensor wk;
      Backend::template bwd_elemt<scalar_t, param_t>(
          s, xc, dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), yc.defined() ? yc.data_ptr<scalar_t>() : nullptr,
          m.data_ptr<A>(), v.data_ptr<A>(), param_ptr<param_t>(opt_ptr(weight), wk), static_cast<A>(eps), act,
          k_g ? k_g->data_ptr<A>() : nullptr, k_gx ? k_gx->data_ptr<A>() : nullptr, static_cast<A>(k_scale),
          dx ? dx->data_ptr<scalar_t>() : nullptr, dz ? dz->data_ptr<scalar_t>() : nullptr);
    });
  }

  // SyncBatchNorm's backward halves: local sums (no epilogue), then dx from the global means.
  static std::tuple<Tensor, Tensor> batch_norm_bwd_reduce(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                          const Tensor& var, double eps) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    check_grad_output(kOp, dy, x);
    typename Backend::Guard guard(x);
    Tensor m = acc_vector(mean, x, "mean", s.C), v = acc_vector(var, x, "var", s.C);
    Tensor xc = batch_norm_input(x, s);
    Tensor dyc = like_layout(dy, xc, kOp, "grad_output");
    return reduce(s, dyc, xc, Tensor(), m, v, eps, Act::None);
  }

  static Tensor batch_norm_bwd_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                                     const OptTensor& weight, const Tensor& mean_dy, const Tensor& mean_dy_xhat,
                                     double eps) {
    const BatchNormShape s = check_batch_norm_input(kOp, x);
    check_bn_params(kOp, x, weight, std::nullopt, s.C);
    check_grad_output(kOp, dy, x);
    typename Backend::Guard guard(x);
    Tensor m = acc_vector(mean, x, "mean", s.C), v = acc_vector(var, x, "var", s.C);
    Tensor kg = acc_vector(mean_dy, x, "mean_dy", s.C), kgx = acc_vector(mean_dy_xhat, x, "mean_dy_xhat", s.C);
    Tensor xc = batch_norm_input(x, s);
    Tensor dyc = like_layout(dy, xc, kOp, "grad_output");
    Tensor dx = at::empty_like(xc);
    if (s.numel() > 0) elemt(s, dyc, xc, Tensor(), m, v, weight, eps, Act::None, &kg, &kgx, 1.0, &dx, nullptr);
    return dx;
  }
};

}  // namespace fusenorm

// The GroupNorm ops, shared by every backend: argument checks (torch.nn's, same wording), the
// memory layout, output allocation, empty inputs and dtype dispatch. InstanceNorm is GroupNorm
// with one group per channel.
//
// x: [N, C, *spatial] with S = prod(spatial), in either layout, computed in place:
//   NCS  contiguous (NCHW / NCDHW): group (n, g) is one contiguous run of C/G * S elements;
//   NSC  channels last (NHWC / NDHWC, or any [N, C, *] whose channel stride is 1 and whose spatial
//        dims are dense with stride C): group (n, g) is C/G contiguous channels at each of S sites.
// Any other strides are made contiguous first. y keeps x's layout; mean/rstd are [N, G] in fp32
// (fp64 for fp64 inputs). An optional activation is applied to the affine output in the same pass.
//
// A backend supplies, with Act the activation:
//   template <typename T, typename W> static void fwd(const GroupNormShape&, x, w*, b*, eps, act, y, mean, rstd);
//   template <typename T, typename W> static void bwd(const GroupNormShape&, dy, x, mean, rstd, w*, b*, y*,
//                                                     act, want_dx, want_dw, want_db, dx, dw, db);
// bwd's y (the forward's output, in x's layout) is given with ReLU only: its mask is y > 0, as in
// torch's relu backward, not recomputed from x.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>

#include "common/dispatch.h"
#include "common/row_norm_args.h"

namespace fusenorm {

enum class Act : int { None = 0, Silu = 1, Gelu = 2, Relu = 3 };

Act parse_activation(const std::string& name);

struct GroupNormShape {
  int64_t N = 0, C = 0, S = 0, G = 0;
  bool channels_last = false;  // NSC layout
  int64_t cpg() const { return C / G; }
};

// Checks as torch.group_norm does; returns the shape and whether x is channels-last.
GroupNormShape check_group_norm_args(const char* op, const at::Tensor& x, int64_t num_groups,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias);

// Channel stride 1 and the spatial dims dense with stride C: [N, C, *] stored as [N, *, C]
// (GroupNorm's and BatchNorm's NSC layout).
bool is_channels_last_like(const at::Tensor& x);

// x itself when its layout is NCS or NSC, else a contiguous copy.
at::Tensor group_norm_input(const at::Tensor& x, const GroupNormShape& s);

template <typename Backend>
struct GroupNormOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  static constexpr const char* kOp = "fusenorm.group_norm";

  static std::tuple<Tensor, Tensor, Tensor> group_norm_fwd(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                                           const OptTensor& bias, double eps,
                                                           const std::string& activation) {
    GroupNormShape s = check_group_norm_args(kOp, x, num_groups, weight, bias);
    const Act act = parse_activation(activation);
    typename Backend::Guard guard(x);
    Tensor xc = group_norm_input(x, s);
    Tensor y = at::empty_like(xc);
    auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
    Tensor mean = at::empty({s.N, s.G}, sopt), rstd = at::empty({s.N, s.G}, sopt);
    if (s.N > 0 && s.C > 0 && s.S > 0) {
      FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), kOp, [&] {
        Backend::template fwd<scalar_t, param_t>(s, xc, opt_ptr(weight), opt_ptr(bias), eps, act, y, mean, rstd);
      });
    } else if (s.N > 0 && s.C > 0) {  // no elements per group: variance 0
      mean.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    return {y, mean, rstd};
  }

  static std::tuple<Tensor, Tensor, Tensor> group_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                           const Tensor& rstd, int64_t num_groups,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           const OptTensor& y, const std::string& activation,
                                                           std::array<bool, 3> mask) {
    GroupNormShape s = check_group_norm_args(kOp, x, num_groups, weight, bias);
    check_grad_output(kOp, dy, x);
    check_saved_stat(kOp, "mean", mean, {s.N, s.G}, x);
    check_saved_stat(kOp, "rstd", rstd, {s.N, s.G}, x);
    const Act act = parse_activation(activation);
    typename Backend::Guard guard(x);
    const bool want_dx = mask[0];
    const bool want_dw = mask[1] && opt_ptr(weight);
    const bool want_db = mask[2] && opt_ptr(bias);
    Tensor xc = group_norm_input(x, s);
    // dy (and y) in x's layout, so that one index serves all
    const Tensor dyc = like_layout(dy, xc, kOp, "grad_output");
    TORCH_CHECK(act != Act::Relu || opt_ptr(y), kOp, ": the ReLU backward needs the forward output y");
    const Tensor yc = act == Act::Relu ? like_layout(*y, xc, kOp, "y") : Tensor();
    Tensor dx = want_dx ? at::empty_like(xc) : at::empty({0}, x.options());
    Tensor dw = want_dw ? at::empty(weight->sizes(), weight->options()) : at::empty({0}, x.options());
    Tensor db = want_db ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, x.options());
    if (s.N == 0 || s.C == 0 || s.S == 0) {
      if (want_dw) dw.zero_();
      if (want_db) db.zero_();
      return {dx, dw, db};
    }
    if (!want_dx && !want_dw && !want_db) return {dx, dw, db};
    Tensor meanc = mean.contiguous(), rstdc = rstd.contiguous();
    FUSENORM_DISPATCH(x.scalar_type(), param_dtype(x, weight, bias), kOp, [&] {
      Backend::template bwd<scalar_t, param_t>(s, dyc, xc, meanc, rstdc, opt_ptr(weight), opt_ptr(bias),
                                               yc.defined() ? &yc : nullptr, act, want_dx, want_dw, want_db, dx, dw,
                                               db);
    });
    return {dx, dw, db};
  }
};

}  // namespace fusenorm

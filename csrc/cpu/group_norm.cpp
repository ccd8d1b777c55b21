// fusenorm::group_norm_fwd / group_norm_bwd on CPU, both layouts (see common/group_norm_ops.h).
// Parallel over (n, group). Each group is read from memory once into a cache-resident fp32 copy in
// group order, reduced there with the row-norm helpers (exact two-pass, fixed summation order),
// and written back in the input's layout with the affine step and the activation fused.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/group_norm_ops.h"
#include "cpu/row_norm.h"

namespace fusenorm::cpu {

// Element i of group (n, g) in group order: channel-major (NCS) or site-major (NSC).
struct GroupIndex {
  int64_t C, S, cpg;
  bool nsc;
  int64_t base(int64_t n, int64_t g) const { return nsc ? n * S * C + g * cpg : n * C * S + g * cpg * S; }
  int64_t offset(int64_t i) const { return nsc ? (i / cpg) * C + i % cpg : i; }
  int64_t channel(int64_t g, int64_t i) const { return g * cpg + (nsc ? i % cpg : i / S); }
};

template <typename T, typename A>
inline void gather(const T* src, const GroupIndex& ix, int64_t L, A* dst) {
  if (!ix.nsc) return to_acc(src, dst, L);
  for (int64_t s = 0; s < ix.S; ++s) to_acc(src + s * ix.C, dst + s * ix.cpg, ix.cpg);
}

struct GroupNormBackend {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    const GroupIndex ix{s.C, s.S, s.cpg(), s.channels_last};
    const int64_t L = s.cpg() * s.S;
    const std::vector<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    A* MEAN = mean.data_ptr<A>();
    A* RSTD = rstd.data_ptr<A>();
    at::parallel_for(0, s.N * s.G, row_grain(L), [&](int64_t begin, int64_t end) {
      std::vector<A> v(L);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / s.G, g = ng % s.G, base = ix.base(n, g);
        gather(X + base, ix, L, v.data());
        const A c = v[0];  // pivot, as in the row norms
        const A mu = sum_of(v.data(), L, c) / A(L);
        const A rs = A(1) / std::sqrt(sq_dev_of(v.data(), L, c, mu) / A(L) + static_cast<A>(eps));
        for (int64_t i = 0; i < L; ++i) {
          const int64_t ch = ix.channel(g, i);
          Y[base + ix.offset(i)] = static_cast<T>(activate(act, ((v[i] - c) - mu) * rs * w[ch] + b[ch]));
        }
        MEAN[ng] = c + mu;
        RSTD[ng] = rs;
      }
    });
  }

  // dz = dy * act'(z); dx = rstd (dz w - mean(dz w) - xhat mean(dz w xhat)) over the group;
  // dweight[c] = sum dz xhat, dbias[c] = sum dz, from per-(n, c) partials summed over n in order.
  template <typename T, typename W>
  static void bwd(const GroupNormShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                  const at::Tensor& rstd, const at::Tensor* weight, const at::Tensor* bias, Act act, bool want_dx,
                  bool want_dw, bool want_db, at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
    using A = acc_t<T>;
    const GroupIndex ix{s.C, s.S, s.cpg(), s.channels_last};
    const int64_t L = s.cpg() * s.S;
    const std::vector<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    const T* X = x.data_ptr<T>();
    const T* DY = dy.data_ptr<T>();
    T* DX = want_dx ? dx.data_ptr<T>() : nullptr;
    const A* MEAN = mean.data_ptr<A>();
    const A* RSTD = rstd.data_ptr<A>();
    std::vector<A> part_w(s.N * s.C, A(0)), part_b(s.N * s.C, A(0));
    at::parallel_for(0, s.N * s.G, row_grain(L), [&](int64_t begin, int64_t end) {
      std::vector<A> v(L), d(L), wg(L);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / s.G, g = ng % s.G, base = ix.base(n, g);
        gather(X + base, ix, L, v.data());
        gather(DY + base, ix, L, d.data());
        const A mu = MEAN[ng], rs = RSTD[ng];
        for (int64_t i = 0; i < L; ++i) {
          const int64_t ch = ix.channel(g, i);
          const A xhat = (v[i] - mu) * rs;
          if (act != Act::None) d[i] *= activate_grad(act, xhat * w[ch] + b[ch]);  // d is now dz
          wg[i] = w[ch];
          part_w[n * s.C + ch] += d[i] * xhat;
          part_b[n * s.C + ch] += d[i];
        }
        if (!want_dx) continue;
        A s_g, s_gx;
        grad_sums(d.data(), wg.data(), v.data(), L, mu, s_g, s_gx);
        const A a = s_g / A(L), cc = s_gx * rs / A(L);
        for (int64_t i = 0; i < L; ++i)
          DX[base + ix.offset(i)] = static_cast<T>(rs * (d[i] * wg[i] - a - (v[i] - mu) * rs * cc));
      }
    });
    auto finish = [&](const std::vector<A>& part, at::Tensor& out) {
      W* o = out.data_ptr<W>();
      for (int64_t c = 0; c < s.C; ++c) {
        A t = 0;
        for (int64_t n = 0; n < s.N; ++n) t += part[n * s.C + c];
        o[c] = static_cast<W>(t);
      }
    };
    if (want_dw) finish(part_w, dw);
    if (want_db) finish(part_b, db);
  }
};

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  using Ops = fusenorm::GroupNormOps<fusenorm::cpu::GroupNormBackend>;
  m.impl("group_norm_fwd", &Ops::group_norm_fwd);
  m.impl("group_norm_bwd", &Ops::group_norm_bwd);
}

// CUDA GroupNorm (and InstanceNorm, one group per channel), both layouts (common/group_norm_ops.h).
//
// Forward, three launches that fill the device at any batch size: per-(n, c) partial statistics
// (common/channel_reduce.cuh: NCS runs, or NSC tiles with threads along the channels), a finalize
// that merges them per (n, group) in a fixed order (Chan), then one vectorized grid-stride pass
// that normalizes, applies the affine step and the activation.
// Backward, the same shape: per-(n, c) partial sums of dz and dz * xhat (the same partial kernels,
// with GroupNormGradOp), then one warp per channel for dweight / dbias and one per (n, group) for
// the group sums, then a vectorized dx pass. x and dy are read twice; no atomics: deterministic.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/activation.h"
#include "common/channel_reduce.cuh"
#include "common/dispatch.h"
#include "common/group_norm_ops.h"
#include "common/reduce.cuh"
#include "common/simt.cuh"
#include "common/vec.cuh"
#include "common/welford.h"
#include "cuda/onchip_norm.cuh"

namespace fusenorm::cuda {

constexpr int kGroupBlock = kChannelThreads;  // the elementwise passes use elementwise_grid

// Forward statistics: one warp per (n, group) merges the per-(n, c) partials of
// common/channel_reduce.cuh, part[n * stride_n + sp * stride_sp + c] over the slices and the group's
// channels, in a fixed order; the partials are relative to the group's first value
// x[n * piv_n + g * piv_g], added back here.
template <typename T>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_finalize_kernel(const ChanPart<acc_t<T>>* __restrict__ part, const T* __restrict__ x, int64_t N,
                               int64_t G, int64_t cpg, int64_t splits, int64_t stride_n, int64_t stride_sp,
                               int64_t piv_n, int64_t piv_g, acc_t<T> eps, acc_t<T>* __restrict__ mean,
                               acc_t<T>* __restrict__ rstd) {
  using A = acc_t<T>;
  const int64_t ng = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (ng >= N * G) return;  // the whole warp
  const int64_t n = ng / G, g = ng % G;
  const ChanPart<A> p = chan_warp_merge<false, A>(splits * cpg, [&](int64_t k) {
    return part[n * stride_n + (k / cpg) * stride_sp + g * cpg + k % cpg];
  });
  if ((threadIdx.x & 31) != 0) return;
  mean[ng] = pivot_of(static_cast<A>(x[n * piv_n + g * piv_g])) + p.a;
  rstd[ng] = simt::rsqrt(p.b / p.n + eps);
}

// The channel c and sample n of element e: NSC: e = (n * S + site) * C + c; NCS: e = (n * C + c) * S + site.
template <bool NSC, typename I>
__device__ __forceinline__ void channel_and_sample(I e, I C, I S, I& c, I& n) {
  if constexpr (NSC) {
    const I row = e / C;
    c = e - row * C;
    n = row / S;
  } else {
    const I plane = e / S;
    c = plane % C;
    n = plane / C;
  }
}

// The (n, group) index of channel c, then of c + 1, c + 2, ... (one division per vector).
template <typename I>
struct GroupStep {
  I ng, r, cpg;
  __device__ __forceinline__ GroupStep(I c, I n, I cpg_, I G) : ng(n * G + c / cpg_), r(c % cpg_), cpg(cpg_) {}
  __device__ __forceinline__ void next() {
    if (++r == cpg) {
      r = 0;
      ++ng;
    }
  }
};

// y = act((x - mean[n, g]) * rstd[n, g] * w[c] + b[c]) over 16-byte vectors of x (V values of one
// channel for NCS, V consecutive channels for NSC), grid-stride.
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                            const W* __restrict__ b, const acc_t<T>* __restrict__ mean,
                            const acc_t<T>* __restrict__ rstd, I vecs, I C, I S, I cpg, I G, Act act) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    I c, n;
    channel_and_sample<NSC>(i * V, C, S, c, n);
    const Vec<T, V> xv = load_vec<V>(x, i);
    Vec<T, V> out;
    GroupStep<I> gs(c, n, cpg, G);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I cj = NSC ? c + j : c;
      if (NSC && j > 0) gs.next();
      A z = (static_cast<A>(xv.v[j]) - mean[gs.ng]) * rstd[gs.ng];
      if (w) z *= static_cast<A>(w[cj]);
      if (b) z += static_cast<A>(b[cj]);
      out.v[j] = static_cast<T>(activate(act, z));
    }
    store_vec<V>(y, i, out);
  }
}

// Backward, per element: xhat = (x - mean[n, g]) * rstd[n, g], z = xhat * w[c] + b[c],
// dz = dy * act'(z); ReLU's mask comes from the forward's output y instead (its value yv), as in
// torch's relu backward. The GRAD partials of common/channel_reduce.cuh sum dz and dz * xhat per (n, c).
template <typename A, typename W>
struct GroupNormGradOp {
  const A* mean;
  const A* rstd;
  const W* w;
  const W* b;
  int64_t C, G, cpg;
  bool nsc;  // NCS: k is the run n * C + c; NSC: k = c, z = n
  Act act;
  struct Ctx {
    A mu, rs, w, b;
  };
  __device__ __forceinline__ Ctx ctx(int64_t k, int64_t z) const {
    const int64_t n = nsc ? z : k / C, c = nsc ? k : k % C, ng = n * G + c / cpg;
    return {mean[ng], rstd[ng], w ? static_cast<A>(w[c]) : A(1), b ? static_cast<A>(b[c]) : A(0)};
  }
  template <typename T>
  __device__ __forceinline__ void add(const Ctx& c, T x, T dy, const T* y, T yv, A& a, A& bsum) const {
    const A xhat = (static_cast<A>(x) - c.mu) * c.rs;
    A d = static_cast<A>(dy);
    if (act == Act::Relu) {
      d = grad_in_relu<A>(dy, y, yv);
    } else if (act != Act::None) {
      d = activate_backward(act, xhat * c.w + c.b, d);
    }
    a += d;
    bsum += d * xhat;
  }
};

// One warp per (n, group): s_g = sum_c w[c] * sum dz, s_gx = sum_c w[c] * sum dz * xhat over the
// group's channels and the slices (part[n * stride_n + sp * stride_sp + c]), in a fixed order.
template <typename A, typename W>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_bwd_group_sums_kernel(const ChanPart<A>* __restrict__ part, const W* __restrict__ w, int64_t N,
                                     int64_t G, int64_t cpg, int64_t splits, int64_t stride_n, int64_t stride_sp,
                                     A* __restrict__ s_g, A* __restrict__ s_gx) {
  const int64_t ng = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (ng >= N * G) return;  // the whole warp
  const int64_t n = ng / G, g = ng % G;
  const ChanPart<A> p = chan_warp_merge<true, A>(splits * cpg, [&](int64_t k) {
    const int64_t c = g * cpg + k % cpg;
    const ChanPart<A> q = part[n * stride_n + (k / cpg) * stride_sp + c];
    const A wc = w ? static_cast<A>(w[c]) : A(1);
    return ChanPart<A>{simt::mul_rn(wc, q.a), wc * q.b, A(0)};
  });
  if ((threadIdx.x & 31) != 0) return;
  s_g[ng] = p.a;
  s_gx[ng] = p.b;
}

// One warp per channel: dbias = sum dz, dweight = sum dz * xhat over the samples and slices.
template <typename A, typename W>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_bwd_channel_sums_kernel(const ChanPart<A>* __restrict__ part, int64_t N, int64_t C, int64_t splits,
                                       int64_t stride_n, int64_t stride_sp, W* __restrict__ dw, W* __restrict__ db) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (c >= C) return;  // the whole warp
  const ChanPart<A> p = chan_warp_merge<true, A>(
      N * splits, [&](int64_t k) { return part[(k / splits) * stride_n + (k % splits) * stride_sp + c]; });
  if ((threadIdx.x & 31) != 0) return;
  if (dw) dw[c] = static_cast<W>(p.b);
  if (db) db[c] = static_cast<W>(p.a);
}

// dx = rstd * (dz * w - s_g / L - xhat * s_gx / L), L = cpg * S, over 16-byte vectors as in the
// forward's apply pass (y: the forward's output, for ReLU's mask, else null).
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ dx,
                         const W* __restrict__ w, const W* __restrict__ b, const acc_t<T>* __restrict__ mean,
                         const acc_t<T>* __restrict__ rstd, const acc_t<T>* __restrict__ s_g,
                         const acc_t<T>* __restrict__ s_gx, acc_t<T> inv_L, I vecs, I C, I S, I cpg, I G, Act act) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    I c, n;
    channel_and_sample<NSC>(i * V, C, S, c, n);
    const Vec<T, V> xv = load_vec<V>(x, i), dv = load_vec<V>(dy, i);
    Vec<T, V> yv{};
    if (y) yv = load_vec<V>(y, i);
    Vec<T, V> out;
    GroupStep<I> gs(c, n, cpg, G);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I cj = NSC ? c + j : c;
      if (NSC && j > 0) gs.next();
      const I ng = gs.ng;
      const A rs = rstd[ng], xhat = (static_cast<A>(xv.v[j]) - mean[ng]) * rs;
      const A wc = w ? static_cast<A>(w[cj]) : A(1);
      A d = static_cast<A>(dv.v[j]);
      if (act == Act::Relu) {
        d = grad_in_relu<A>(dv.v[j], y, yv.v[j]);
      } else if (act != Act::None) {
        d = activate_backward(act, xhat * wc + (b ? static_cast<A>(b[cj]) : A(0)), d);
      }
      out.v[j] = static_cast<T>(rs * (simt::mul_rn(d, wc) - s_g[ng] * inv_L - xhat * (s_gx[ng] * inv_L)));
    }
    store_vec<V>(dx, i, out);
  }
}

struct GroupNormBackend {
  using Guard = simt::DeviceGuard;

  // Per-(n, c) partials of a GroupNorm input, NCS as N * C runs of S values, NSC as N batches of
  // [S, C]; partial (n, slice sp, c) is at n * stride_n + sp * stride_sp + c.
  struct Partials {
    ChannelPartials p;
    int64_t stride_n, stride_sp;
  };
  template <typename T, bool GRAD, typename Op>
  static Partials partials(const GroupNormShape& s, const at::Tensor& x, const T* dy, const T* y, Op op, int64_t pgrp,
                           const at::TensorOptions& acc_options, cudaStream_t stream) {
    const T* X = x.data_ptr<T>();
    const int64_t target = target_blocks(x);
    Partials out;
    if (s.channels_last) {
      out.p = channel_partials<T, GRAD>(true, X, dy, y, op, 1, s.C, s.S, s.N, s.S, pgrp, target, acc_options, stream);
      out.stride_n = out.p.splits * s.C;
      out.stride_sp = s.C;
    } else {
      out.p = channel_partials<T, GRAD>(false, X, dy, y, op, 1, s.N * s.C, s.S, 1, 0, pgrp, target, acc_options,
                                        stream);
      out.stride_n = s.C;
      out.stride_sp = s.N * s.C;
    }
    return out;
  }

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    at::Tensor wk, bk;
    const cudaStream_t stream = simt::current_stream();
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    const bool nsc = s.channels_last;
    const W* w = param_ptr<W>(weight, wk);
    const W* b = param_ptr<W>(bias, bk);
    // each (n, group) on chip (cuda/onchip_norm.cuh): one pass
    const int64_t L = s.cpg() * s.S;
    const T* no_z = nullptr;
    auto units = [&](int64_t V) { return OnchipUnits{s.N * s.G, 1, L / V, L / V, s.G, s.cpg(), s.S / V, 0}; };
    if (L > 0 && (nsc ? onchip_nsc_fwd<T, W>(s.N, s.S, s.C, s.cpg(), x.get_device(), X, Y, w, b,
                                             static_cast<A>(eps), act, true, mean.data_ptr<A>(), rstd.data_ptr<A>())
                      : onchip_norm_fwd<T, W>(units, s.S, x.get_device(), X, no_z, Y, w, b, static_cast<A>(eps), act,
                                              true, mean.data_ptr<A>(), rstd.data_ptr<A>())))
      return;
    const Partials p = partials<T, false>(s, x, nullptr, nullptr, StatsOp{}, s.cpg(), mean.options(), stream);
    const int64_t piv_n = s.C * s.S, piv_g = nsc ? s.cpg() : s.cpg() * s.S;
    constexpr int64_t per_block = kGroupBlock / 32;  // a warp per (n, group)
    simt::launch(group_norm_finalize_kernel<T>, dim3(ceil_div(s.N * s.G, per_block)), dim3(kGroupBlock), 0, stream,
                 p.p.parts<A>(), X, s.N, s.G, s.cpg(), p.p.splits, p.stride_n, p.stride_sp, piv_n, piv_g,
                 static_cast<A>(eps), mean.data_ptr<A>(), rstd.data_ptr<A>());
    channel_elementwise<T>(nsc, s.C, s.S, s.N * s.C * s.S, is_aligned(X, 16) && is_aligned(Y, 16),
                           [&](auto vw, auto layout, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.N * s.C * s.S / V;
      simt::launch(group_norm_apply_kernel<T, W, V, decltype(layout)::value, I>, elementwise_grid(x, vecs),
                   dim3(kGroupBlock), 0, stream, X, Y, w, b, mean.data_ptr<A>(), rstd.data_ptr<A>(), I(vecs), I(s.C),
                   I(s.S), I(s.cpg()), I(s.G), act);
    });
  }

  template <typename T, typename W>
  static void bwd(const GroupNormShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                  const at::Tensor& rstd, const at::Tensor* weight, const at::Tensor* bias, const at::Tensor* y,
                  Act act, bool want_dx, bool want_dw, bool want_db, at::Tensor& dx, at::Tensor& dw,
                  at::Tensor& db) {
    using A = acc_t<T>;
    at::Tensor wk, bk;
    const W* w = param_ptr<W>(weight, wk);
    const W* b = param_ptr<W>(bias, bk);
    const cudaStream_t stream = simt::current_stream();
    const T* X = x.data_ptr<T>();
    const T* DY = dy.data_ptr<T>();
    const T* Y = y ? y->data_ptr<T>() : nullptr;
    const A* MEAN = mean.data_ptr<A>();
    const A* RSTD = rstd.data_ptr<A>();
    const bool nsc = s.channels_last;
    const GroupNormGradOp<A, W> op{MEAN, RSTD, w, b, s.C, s.G, s.cpg(), nsc, act};
    // per-(n, c) sums of dz and dz * xhat
    const Partials pp = partials<T, true>(s, x, DY, Y, op, 1, mean.options(), stream);
    const ChannelPartials& p = pp.p;
    const int64_t stride_n = pp.stride_n, stride_sp = pp.stride_sp;
    constexpr int64_t per_block = kGroupBlock / 32;  // a warp per output
    if (want_dw || want_db)
      simt::launch(group_norm_bwd_channel_sums_kernel<A, W>, dim3(ceil_div(s.C, per_block)), dim3(kGroupBlock), 0,
                   stream, p.parts<A>(), s.N, s.C, p.splits, stride_n, stride_sp,
                   want_dw ? dw.data_ptr<W>() : nullptr, want_db ? db.data_ptr<W>() : nullptr);
    if (!want_dx) return;
    at::Tensor sums = at::empty({2, s.N * s.G}, mean.options());
    A* SG = sums.data_ptr<A>();
    A* SGX = SG + s.N * s.G;
    simt::launch(group_norm_bwd_group_sums_kernel<A, W>, dim3(ceil_div(s.N * s.G, per_block)), dim3(kGroupBlock), 0,
                 stream, p.parts<A>(), w, s.N, s.G, s.cpg(), p.splits, stride_n, stride_sp, SG, SGX);
    T* DX = dx.data_ptr<T>();
    const A inv_L = A(1) / static_cast<A>(s.cpg() * s.S);
    channel_elementwise<T>(nsc, s.C, s.S, s.N * s.C * s.S,
                           is_aligned(X, 16) && is_aligned(DY, 16) && is_aligned(Y, 16) && is_aligned(DX, 16),
                           [&](auto vw, auto layout, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.N * s.C * s.S / V;
      simt::launch(group_norm_dx_kernel<T, W, V, decltype(layout)::value, I>, elementwise_grid(x, vecs),
                   dim3(kGroupBlock), 0, stream, DY, X, Y, DX, w, b, MEAN, RSTD, SG, SGX, inv_L, I(vecs), I(s.C), I(s.S),
                   I(s.cpg()), I(s.G), act);
    });
  }
};

}  // namespace fusenorm::cuda

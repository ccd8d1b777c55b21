// CUDA GroupNorm (and InstanceNorm, one group per channel), both layouts (common/group_norm_ops.h).
//
// Forward, three launches that fill the device at any batch size: per-(n, c) partial statistics
// (common/channel_reduce.cuh: NCS runs, or NSC tiles with threads along the channels), a finalize
// that merges them per (n, group) in a fixed order (Chan), then one vectorized grid-stride pass
// that normalizes, applies the affine step and the activation.
// Backward: one block per (n, group) for dx; each warp also owns some of the group's channels and
// sums dz * xhat and dz over the sites into [N, C] partials, which column_sum_kernel adds over n in
// a fixed order: deterministic, no atomics. Index math is int64; the group's elements are visited
// in group order (channel-major for NCS, site-major for NSC) so consecutive threads read
// consecutive addresses in both layouts.
// TODO(perf): the backward still reads x and dy three times per group with scalar loads.
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

namespace fusenorm::cuda {

constexpr int kGroupBlock = 256;

struct GroupIndex {
  int64_t C, S, cpg;
  bool nsc;
  __device__ __forceinline__ int64_t base(int64_t n, int64_t g) const {
    return nsc ? n * S * C + g * cpg : n * C * S + g * cpg * S;
  }
  __device__ __forceinline__ int64_t offset(int64_t i) const { return nsc ? (i / cpg) * C + i % cpg : i; }
  __device__ __forceinline__ int64_t channel(int64_t g, int64_t i) const { return g * cpg + (nsc ? i % cpg : i / S); }
};

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
  mean[ng] = static_cast<A>(x[n * piv_n + g * piv_g]) + p.a;
  rstd[ng] = simt::rsqrt(p.b / p.n + eps);
}

// y = act((x - mean[n, g]) * rstd[n, g] * w[c] + b[c]) over 16-byte vectors of x (V values of one
// channel for NCS, V consecutive channels for NSC), grid-stride.
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                            const W* __restrict__ b, const acc_t<T>* __restrict__ mean,
                            const acc_t<T>* __restrict__ rstd, I vecs, I C, I S, I cpg, I G, Act act) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    const I e = i * V;
    I c, n;
    if constexpr (NSC) {
      const I row = e / C;  // n * S + site
      c = e - row * C;
      n = row / S;
    } else {
      const I plane = e / S;  // n * C + c
      c = plane % C;
      n = plane / C;
    }
    const Vec<T, V> xv = load_vec<V>(x, i);
    Vec<T, V> out;
    // the group of channel c + j, stepped along j (one division per vector)
    I g = c / cpg, r = c - g * cpg;
    A mu = mean[n * G + g], rs = rstd[n * G + g];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I cj = NSC ? c + j : c;
      if (NSC && j > 0 && ++r == cpg) {
        r = 0;
        ++g;
        mu = mean[n * G + g];
        rs = rstd[n * G + g];
      }
      A z = (static_cast<A>(xv.v[j]) - mu) * rs;
      if (w) z *= static_cast<A>(w[cj]);
      if (b) z += static_cast<A>(b[cj]);
      out.v[j] = static_cast<T>(activate(act, z));
    }
    store_vec<V>(y, i, out);
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ mean,
                          const acc_t<T>* __restrict__ rstd, const W* __restrict__ w, const W* __restrict__ b,
                          T* __restrict__ dx, acc_t<T>* __restrict__ part_w, acc_t<T>* __restrict__ part_b,
                          GroupIndex ix, int64_t G, Act act) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G;
  const int64_t L = ix.cpg * ix.S;
  const int64_t base = ix.base(n, g);
  const A mu = mean[ng], rs = rstd[ng];
  // dz and g = dz * w for element i of the group, recomputing z when there is an activation
  auto grad = [&](int64_t i, A& xhat, A& dz, A& wc) {
    const int64_t o = base + ix.offset(i), ch = ix.channel(g, i);
    xhat = (static_cast<A>(x[o]) - mu) * rs;
    wc = w ? static_cast<A>(w[ch]) : A(1);
    dz = static_cast<A>(dy[o]);
    if (act != Act::None) dz = activate_backward(act, xhat * wc + (b ? static_cast<A>(b[ch]) : A(0)), dz);
  };
  if (dx) {
    A s_g = A(0), s_gx = A(0);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      A xhat, dz, wc;
      grad(i, xhat, dz, wc);
      const A gi = simt::mul_rn(dz, wc);
      s_g += gi;
      s_gx += gi * xhat;
    }
    const A a = block_allsum(s_g, red) / static_cast<A>(L);
    const A cc = block_allsum(s_gx, red) / static_cast<A>(L);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      A xhat, dz, wc;
      grad(i, xhat, dz, wc);
      dx[base + ix.offset(i)] = static_cast<T>(rs * (simt::mul_rn(dz, wc) - a - xhat * cc));
    }
  }
  if (!part_w && !part_b) return;
  // Each channel's sites are split over wpc warps (all warps busy when the group has fewer channels
  // than the block has warps, as InstanceNorm's one); lanes stride the sites; a channel's wpc
  // partials are added in order.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int wpc = ix.cpg < warps ? warps / static_cast<int>(ix.cpg) : 1;
  __shared__ A sub_w[32], sub_b[32];
  for (int64_t j = warp / wpc; j < ix.cpg; j += warps / wpc) {
    A sw = A(0), sb = A(0);
    for (int64_t site = lane + (warp % wpc) * 32; site < ix.S; site += 32 * wpc) {
      const int64_t i = ix.nsc ? site * ix.cpg + j : j * ix.S + site;  // group order index
      A xhat, dz, wc;
      grad(i, xhat, dz, wc);
      sw += dz * xhat;
      sb += dz;
    }
    sw = warp_allsum(sw);
    sb = warp_allsum(sb);
    if (lane != 0) continue;
    if (wpc == 1) {
      if (part_w) part_w[n * ix.C + g * ix.cpg + j] = sw;
      if (part_b) part_b[n * ix.C + g * ix.cpg + j] = sb;
    } else {
      sub_w[warp] = sw;
      sub_b[warp] = sb;
    }
  }
  if (wpc == 1) return;  // uniform over the block
  __syncthreads();
  if (threadIdx.x < ix.cpg) {
    const int64_t j = threadIdx.x;
    A sw = A(0), sb = A(0);
    for (int k = 0; k < wpc; ++k) {
      sw += sub_w[j * wpc + k];
      sb += sub_b[j * wpc + k];
    }
    if (part_w) part_w[n * ix.C + g * ix.cpg + j] = sw;
    if (part_b) part_b[n * ix.C + g * ix.cpg + j] = sb;
  }
}

struct GroupNormBackend {
  using Guard = simt::DeviceGuard;

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    constexpr int VW = vec_width<T>();
    at::Tensor wk, bk;
    const cudaStream_t stream = simt::current_stream();
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    const int64_t target = int64_t(simt::device_limits(x.get_device()).sms) * 8;
    // per-(n, c) partials: NCS as N * C runs of S values, NSC as N batches of [S, C]
    const bool nsc = s.channels_last;
    const ChannelPartials p =
        nsc ? channel_partials<T, false>(true, X, nullptr, nullptr, nullptr, 1, s.C, s.S, s.N, s.S, s.cpg(), target,
                                         mean.options(), stream)
            : channel_partials<T, false>(false, X, nullptr, nullptr, nullptr, 1, s.N * s.C, s.S, 1, 0, s.cpg(), target,
                                         mean.options(), stream);
    const int64_t stride_n = nsc ? p.splits * s.C : s.C, stride_sp = nsc ? s.C : s.N * s.C;
    const int64_t piv_n = s.C * s.S, piv_g = nsc ? s.cpg() : s.cpg() * s.S;
    constexpr int64_t per_block = kGroupBlock / 32;  // a warp per (n, group)
    simt::launch(group_norm_finalize_kernel<T>, dim3(ceil_div(s.N * s.G, per_block)), dim3(kGroupBlock), 0, stream,
                 p.parts<A>(), X, s.N, s.G, s.cpg(), p.splits, stride_n, stride_sp, piv_n, piv_g,
                 static_cast<A>(eps), mean.data_ptr<A>(), rstd.data_ptr<A>());
    const W* w = param_ptr<W>(weight, wk);
    const W* b = param_ptr<W>(bias, bk);
    const int64_t numel = s.N * s.C * s.S;
    auto run = [&](auto vw, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = numel / V;
      const int64_t grid = std::clamp<int64_t>(ceil_div(vecs, kGroupBlock), 1, target * 4);
      auto launch = [&](auto kernel) {
        simt::launch(kernel, dim3(grid), dim3(kGroupBlock), 0, stream, X, Y, w, b, mean.data_ptr<A>(),
                     rstd.data_ptr<A>(), I(vecs), I(s.C), I(s.S), I(s.cpg()), I(s.G), act);
      };
      if (nsc) {
        launch(group_norm_apply_kernel<T, W, V, true, I>);
      } else {
        launch(group_norm_apply_kernel<T, W, V, false, I>);
      }
    };
    const bool vec = is_aligned(X, 16) && is_aligned(Y, 16) && (nsc ? s.C : s.S) % VW == 0;
    const bool small = numel < (int64_t(1) << 31);
    auto by_index = [&](auto vw) {
      if (small) {
        run(vw, uint32_t(0));
      } else {
        run(vw, int64_t(0));
      }
    };
    if (vec) {
      by_index(std::integral_constant<int, VW>());
    } else {
      by_index(std::integral_constant<int, 1>());
    }
  }

  template <typename T, typename W>
  static void bwd(const GroupNormShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                  const at::Tensor& rstd, const at::Tensor* weight, const at::Tensor* bias, Act act, bool want_dx,
                  bool want_dw, bool want_db, at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
    using A = acc_t<T>;
    at::Tensor wk, bk, part_w, part_b;
    if (want_dw) part_w = at::empty({s.N, s.C}, mean.options());
    if (want_db) part_b = at::empty({s.N, s.C}, mean.options());
    const GroupIndex ix{s.C, s.S, s.cpg(), s.channels_last};
    A* pw = want_dw ? part_w.data_ptr<A>() : nullptr;
    A* pb = want_db ? part_b.data_ptr<A>() : nullptr;
    const cudaStream_t stream = simt::current_stream();
    simt::launch(group_norm_bwd_kernel<T, W>, dim3(s.N * s.G), dim3(kGroupBlock), 0, stream, dy.data_ptr<T>(),
                 x.data_ptr<T>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), param_ptr<W>(weight, wk),
                 param_ptr<W>(bias, bk), want_dx ? dx.data_ptr<T>() : nullptr, pw, pb, ix, s.G, act);
    const int64_t cgrid = (s.C + 31) / 32;
    if (want_dw) simt::launch(column_sum_kernel<A, W>, dim3(cgrid), dim3(32, 16), 0, stream, pw, s.N, s.C, dw.data_ptr<W>());
    if (want_db) simt::launch(column_sum_kernel<A, W>, dim3(cgrid), dim3(32, 16), 0, stream, pb, s.N, s.C, db.data_ptr<W>());
  }
};

}  // namespace fusenorm::cuda

// CUDA GroupNorm (and InstanceNorm, one group per channel), both layouts (common/group_norm_ops.h).
//
// Forward: one block per (n, group); statistics are an exact two-pass over the group (shifted by its
// first element, as in the row norms), then the affine step and the activation in the same pass.
// Backward: one block per (n, group) for dx; each warp also owns some of the group's channels and
// sums dz * xhat and dz over the sites into [N, C] partials, which column_sum_kernel adds over n in
// a fixed order: deterministic, no atomics. Index math is int64; the group's elements are visited
// in group order (channel-major for NCS, site-major for NSC) so consecutive threads read
// consecutive addresses in both layouts.
// TODO(perf): split large groups across blocks (batch 1 fills few SMs) and vectorize the loads.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/activation.h"
#include "common/dispatch.h"
#include "common/group_norm_ops.h"
#include "common/reduce.cuh"
#include "common/simt.cuh"
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

template <typename T, typename W>
__global__ void __launch_bounds__(kGroupBlock)
    group_norm_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                          const W* __restrict__ b, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd,
                          GroupIndex ix, int64_t G, acc_t<T> eps, Act act) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G;
  const int64_t L = ix.cpg * ix.S;
  const T* xg = x + ix.base(n, g);
  T* yg = y + ix.base(n, g);
  const A c = static_cast<A>(xg[0]);
  A s = A(0);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) s += static_cast<A>(xg[ix.offset(i)]) - c;
  const A mu = block_allsum(s, red) / static_cast<A>(L);
  A q = A(0);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const A d = (static_cast<A>(xg[ix.offset(i)]) - c) - mu;
    q += d * d;
  }
  const A rs = simt::rsqrt(block_allsum(q, red) / static_cast<A>(L) + eps);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const int64_t o = ix.offset(i), ch = ix.channel(g, i);
    A z = ((static_cast<A>(xg[o]) - c) - mu) * rs;
    if (w) z *= static_cast<A>(w[ch]);
    if (b) z += static_cast<A>(b[ch]);
    yg[o] = static_cast<T>(activate(act, z));
  }
  if (threadIdx.x == 0) {
    mean[ng] = c + mu;
    rstd[ng] = rs;
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
  // Warp k sums channels k, k + warps, ... over the sites; lanes stride the sites.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t j = warp; j < ix.cpg; j += warps) {
    A sw = A(0), sb = A(0);
    for (int64_t site = lane; site < ix.S; site += 32) {
      const int64_t i = ix.nsc ? site * ix.cpg + j : j * ix.S + site;  // group order index
      A xhat, dz, wc;
      grad(i, xhat, dz, wc);
      sw += dz * xhat;
      sb += dz;
    }
    sw = warp_allsum(sw);
    sb = warp_allsum(sb);
    if (lane == 0) {
      if (part_w) part_w[n * ix.C + g * ix.cpg + j] = sw;
      if (part_b) part_b[n * ix.C + g * ix.cpg + j] = sb;
    }
  }
}

struct GroupNormBackend {
  using Guard = simt::DeviceGuard;

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    at::Tensor wk, bk;
    const GroupIndex ix{s.C, s.S, s.cpg(), s.channels_last};
    simt::launch(group_norm_fwd_kernel<T, W>, dim3(s.N * s.G), dim3(kGroupBlock), 0, simt::current_stream(),
                 x.data_ptr<T>(), y.data_ptr<T>(), param_ptr<W>(weight, wk), param_ptr<W>(bias, bk),
                 mean.data_ptr<A>(), rstd.data_ptr<A>(), ix, s.G, static_cast<A>(eps), act);
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

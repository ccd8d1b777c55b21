// CUDA BatchNorm, both layouts (common/batch_norm_ops.h).
//
// Per-channel reductions (the statistics, and the backward's sums of g and g * (x - mean)) run in
// two launches that fill the device for any shape: the partial kernels of common/channel_reduce.cuh
// (each block reduces one slice of one channel), then bn_finalize_kernel, which merges each
// channel's slices in a fixed order. No atomics: deterministic. No E[x^2] - E[x]^2.
// The elementwise passes (apply, dx) walk x as 16-byte vectors, grid-stride, the channel of each
// vector from its index (32-bit index math when the tensor allows, else 64-bit), computing the
// per-channel coefficients on the fly from mean / var / weight / bias (L1-resident).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/batch_norm_ops.h"
#include "common/channel_reduce.cuh"
#include "common/reduce.cuh"
#include "common/simt.cuh"
#include "common/vec.cuh"
#include "common/welford.h"

namespace fusenorm::cuda {

// Merges each channel's slices in order: statistics -> (mean, biased var); GRAD -> (sum g,
// sum g * xhat).
template <typename A, bool GRAD>
__global__ void __launch_bounds__(kChannelThreads)
    bn_finalize_kernel(const ChanPart<A>* __restrict__ part, int64_t splits, int64_t C, const A* __restrict__ var,
                       A eps, A* __restrict__ out_a, A* __restrict__ out_b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  ChanPart<A> p = part[c];
  for (int64_t sp = 1; sp < splits; ++sp) chan_merge<GRAD>(p, part[sp * C + c]);
  out_a[c] = p.a;
  out_b[c] = GRAD ? p.b * simt::rsqrt(var[c] + eps) : p.b / p.n;
}

// y = act((x - mean) * rstd * w + b + z) over 16-byte vectors (V values of one channel for NCS,
// V consecutive channels for NSC).
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kChannelThreads)
    bn_apply_kernel(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y,
                    const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ var, const W* __restrict__ w,
                    const W* __restrict__ b, acc_t<T> eps, bool relu, I vecs, I C, I S) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    const I e = i * V, c = NSC ? e % C : (e / S) % C;
    const Vec<T, V> xv = load_vec<V>(x, i);
    Vec<T, V> zv{}, out;
    if (z) zv = load_vec<V>(z, i);
    A mu = mean[c], sc = simt::rsqrt(var[c] + eps) * (w ? static_cast<A>(w[c]) : A(1)), sh = b ? static_cast<A>(b[c]) : A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (NSC && j > 0) {
        const I cj = c + j;
        mu = mean[cj];
        sc = simt::rsqrt(var[cj] + eps) * (w ? static_cast<A>(w[cj]) : A(1));
        sh = b ? static_cast<A>(b[cj]) : A(0);
      }
      A v = (static_cast<A>(xv.v[j]) - mu) * sc + sh;
      if (z) v += static_cast<A>(zv.v[j]);
      if (relu) v = v > A(0) ? v : A(0);
      out.v[j] = static_cast<T>(v);
    }
    store_vec<V>(y, i, out);
  }
}

// dx = w * rstd * (g - k * k_g[c] - xhat * k * k_gx[c]) (eval, k_g null: w * rstd * g); dz = g.
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kChannelThreads)
    bn_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ dx,
                   T* __restrict__ dz, const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ var,
                   const W* __restrict__ w, const acc_t<T>* __restrict__ k_g, const acc_t<T>* __restrict__ k_gx,
                   acc_t<T> k, acc_t<T> eps, I vecs, I C, I S) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    const I e = i * V, c = NSC ? e % C : (e / S) % C;
    const Vec<T, V> dv = load_vec<V>(dy, i);
    Vec<T, V> xv{}, yv{}, gx, gz;
    if (y) yv = load_vec<V>(y, i);
    if (dx) xv = load_vec<V>(x, i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I cj = NSC ? c + j : c;
      const A g = grad_in_relu<A>(dv.v[j], y, yv.v[j]);
      gz.v[j] = static_cast<T>(g);
      const A rs = simt::rsqrt(var[cj] + eps), a = rs * (w ? static_cast<A>(w[cj]) : A(1));
      A d = a * g;
      if (k_g) d = a * (g - k * k_g[cj]) - (static_cast<A>(xv.v[j]) - mean[cj]) * (a * rs * k * k_gx[cj]);
      gx.v[j] = static_cast<T>(d);
    }
    if (dz) store_vec<V>(dz, i, gz);
    if (dx) store_vec<V>(dx, i, gx);
  }
}

struct BatchNormBackend {
  using Guard = simt::DeviceGuard;

  // Blocks for a grid that fills the device several times over.
  static int64_t target_blocks(const at::Tensor& x) { return int64_t(simt::device_limits(x.get_device()).sms) * 8; }

  template <typename T, bool GRAD>
  static void reduce(const BatchNormShape& s, const at::Tensor& xc, const T* x, const T* dy, const T* y,
                     const acc_t<T>* mean, const acc_t<T>* var, acc_t<T> eps, acc_t<T>* out_a, acc_t<T>* out_b) {
    using A = acc_t<T>;
    const cudaStream_t stream = simt::current_stream();
    const ChannelPartials p = channel_partials<T, GRAD>(s.channels_last, x, dy, y, mean, s.N, s.C, s.S, 1, s.count(),
                                                        target_blocks(xc), xc.options().dtype(stat_dtype(xc.scalar_type())),
                                                        stream);
    simt::launch(bn_finalize_kernel<A, GRAD>, dim3(ceil_div(s.C, kChannelThreads)), dim3(kChannelThreads), 0, stream,
                 p.parts<A>(), p.splits, s.C, var, eps, out_a, out_b);
  }

  template <typename T>
  static void stats(const BatchNormShape& s, const at::Tensor& xc, const T* x, acc_t<T>* mean, acc_t<T>* var) {
    reduce<T, false>(s, xc, x, nullptr, nullptr, nullptr, nullptr, acc_t<T>(0), mean, var);
  }

  template <typename T>
  static void bwd_reduce(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                         const acc_t<T>* mean, const acc_t<T>* var, acc_t<T> eps, Act, acc_t<T>* sum_g,
                         acc_t<T>* sum_gx) {
    reduce<T, true>(s, xc, x, dy, y, mean, var, eps, sum_g, sum_gx);
  }

  template <typename T, typename W>
  static void fwd_train(const BatchNormShape& s, const at::Tensor& xc, const T* x, const W* w, const W* b, const T* z,
                        acc_t<T> eps, Act act, T* y, acc_t<T>* mean, acc_t<T>* var) {
    compose_fwd_train<BatchNormBackend, T, W>(s, xc, x, w, b, z, eps, act, y, mean, var);
  }

  template <typename T, typename W>
  static void bwd(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                  const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act act, bool training,
                  acc_t<T>* sum_g, acc_t<T>* sum_gx, T* dx, T* dz) {
    compose_bwd<BatchNormBackend, T, W>(s, xc, dy, x, y, mean, var, w, eps, act, training, sum_g, sum_gx, dx, dz);
  }

  // Runs f(V, NSC, I) with the widest vector the layout and alignment allow and the narrowest
  // index type; vecs = number of V-vectors.
  template <typename T, typename F>
  static void elementwise(const BatchNormShape& s, bool aligned, F&& f) {
    constexpr int VW = vec_width<T>();
    const bool vec = aligned && (s.channels_last ? s.C % VW == 0 : s.S % VW == 0);
    const bool small = s.numel() < (int64_t(1) << 31);
    auto go = [&](auto vw, auto nsc) {
      if (small) {
        f(vw, nsc, uint32_t(0));
      } else {
        f(vw, nsc, int64_t(0));
      }
    };
    auto by_layout = [&](auto vw) {
      if (s.channels_last) {
        go(vw, std::true_type());
      } else {
        go(vw, std::false_type());
      }
    };
    if (vec) {
      by_layout(std::integral_constant<int, VW>());
    } else {
      by_layout(std::integral_constant<int, 1>());
    }
  }

  static dim3 elementwise_grid(const at::Tensor& xc, int64_t vecs) {
    return dim3(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(vecs, kChannelThreads), 1, target_blocks(xc) * 4)));
  }

  template <typename T, typename W>
  static void apply(const BatchNormShape& s, const at::Tensor& xc, const T* x, const acc_t<T>* mean,
                    const acc_t<T>* var, const W* w, const W* b, const T* z, acc_t<T> eps, Act act, T* y) {
    const bool aligned = is_aligned(x, 16) && is_aligned(z, 16) && is_aligned(y, 16);
    elementwise<T>(s, aligned, [&](auto vw, auto nsc, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.numel() / V;
      simt::launch(bn_apply_kernel<T, W, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kChannelThreads), 0,
                   simt::current_stream(), x, z, y, mean, var, w, b, eps, act == Act::Relu, I(vecs), I(s.C), I(s.S));
    });
  }

  template <typename T, typename W>
  static void bwd_elemt(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                        const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act, const acc_t<T>* k_g,
                        const acc_t<T>* k_gx, acc_t<T> k, T* dx, T* dz) {
    const bool aligned = is_aligned(dy, 16) && is_aligned(x, 16) && is_aligned(y, 16) && is_aligned(dx, 16) &&
                         is_aligned(dz, 16);
    elementwise<T>(s, aligned, [&](auto vw, auto nsc, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.numel() / V;
      simt::launch(bn_grad_kernel<T, W, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kChannelThreads), 0,
                   simt::current_stream(), dy, x, y, dx, dz, mean, var, w, k_g, k_gx, k, eps, I(vecs), I(s.C),
                   I(s.S));
    });
  }
};

}  // namespace fusenorm::cuda

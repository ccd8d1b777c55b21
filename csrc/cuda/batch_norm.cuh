// CUDA BatchNorm, both layouts (common/batch_norm_ops.h).
//
// Per-channel reductions (the statistics, and the backward's sums of g and g * (x - mean)) run in
// two launches that fill the device for any shape: the partial kernels of common/channel_reduce.cuh
// (each block reduces one slice of one channel), then bn_finalize_kernel, which merges each
// channel's slices in a fixed order. No atomics: deterministic. No E[x^2] - E[x]^2.
// The elementwise passes (apply, dx) walk x as 16-byte vectors, grid-stride, the channel of each
// vector from its index (32-bit index math when the tensor allows, else 64-bit), with per-channel
// coefficients that a small kernel computes first into an aligned workspace (channels-last reads
// them as vectors too).
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
#include "cuda/onchip_norm.cuh"

namespace fusenorm::cuda {

// One warp per channel merges its slices (lanes stride them, then the warp; a fixed order):
// statistics -> (pivot + mean, biased var), the pivot being x[c * piv_stride]; GRAD -> (sum g,
// sum g * xhat).
template <typename T, bool GRAD>
__global__ void __launch_bounds__(kChannelThreads)
    bn_finalize_kernel(const ChanPart<acc_t<T>>* __restrict__ part, int64_t splits, int64_t C,
                       const T* __restrict__ x, int64_t piv_stride, const acc_t<T>* __restrict__ var, acc_t<T> eps,
                       acc_t<T>* __restrict__ out_a, acc_t<T>* __restrict__ out_b) {
  using A = acc_t<T>;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (c >= C) return;  // the whole warp
  const ChanPart<A> p = chan_warp_merge<GRAD, A>(splits, [&](int64_t k) { return part[k * C + c]; });
  if ((threadIdx.x & 31) != 0) return;
  if constexpr (GRAD) {
    out_a[c] = p.a;
    out_b[c] = p.b * simt::rsqrt(var[c] + eps);
  } else {
    out_a[c] = pivot_of(static_cast<A>(x[c * piv_stride])) + p.a;
    out_b[c] = p.b / p.n;
  }
}

// The elementwise passes read per-channel coefficients from an aligned [K][C] workspace that a
// small kernel fills first: apply (K = 3): mean, scale = rstd * w, shift = b; dx (K = 4): mean,
// a = rstd * w, kg = k * k_g, e = a * rstd * k * k_gx (kg = e = 0 in eval).
template <typename A, typename W>
__global__ void __launch_bounds__(kChannelThreads)
    bn_coef_kernel(const A* __restrict__ mean, const A* __restrict__ var, const W* __restrict__ w,
                   const W* __restrict__ b, const A* __restrict__ k_g, const A* __restrict__ k_gx, A k, A eps,
                   int64_t C, bool grad, A* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A rs = simt::rsqrt(var[c] + eps), a = rs * (w ? static_cast<A>(w[c]) : A(1));
  coef[c] = mean[c];
  coef[C + c] = a;
  if (!grad) {
    coef[2 * C + c] = b ? static_cast<A>(b[c]) : A(0);
  } else {
    coef[2 * C + c] = k_g ? k * k_g[c] : A(0);
    coef[3 * C + c] = k_g ? a * rs * k * k_gx[c] : A(0);
  }
}

// V coefficients of channels [c, c + V) (NSC: one 16-byte-aligned vector per array), or channel
// c's broadcast (NCS).
template <int V, bool NSC, typename A, typename I>
__device__ __forceinline__ Vec<A, V> coef_vec(const A* p, I c) {
  if constexpr (NSC) {
    return load_vec<V>(p + c, 0);
  } else {
    Vec<A, V> out;
    const A v = p[c];
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = v;
    return out;
  }
}

// y = act((x - mean) * scale + shift + z) over 16-byte vectors (V values of one channel for NCS,
// V consecutive channels for NSC).
template <typename T, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kChannelThreads)
    bn_apply_kernel(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y,
                    const acc_t<T>* __restrict__ coef, bool relu, I vecs, I C, I S) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    const I e = i * V, c = NSC ? e % C : (e / S) % C;
    const Vec<T, V> xv = load_vec<V>(x, i);
    Vec<T, V> zv{}, out;
    if (z) zv = load_vec<V>(z, i);
    const Vec<A, V> mu = coef_vec<V, NSC>(coef, c), sc = coef_vec<V, NSC>(coef + C, c),
                    sh = coef_vec<V, NSC>(coef + 2 * C, c);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A v = (static_cast<A>(xv.v[j]) - mu.v[j]) * sc.v[j] + sh.v[j];
      if (z) v += static_cast<A>(zv.v[j]);
      if (relu) v = v < A(0) ? A(0) : v;  // NaN stays NaN
      out.v[j] = static_cast<T>(v);
    }
    store_vec<V>(y, i, out);
  }
}

// dx = a * (g - kg) - (x - mean) * e; dz = g. Eval passes x = null: dx = a * g, x not read (a NaN
// or infinite x leaves dx finite, as torch.nn's eval backward does).
template <typename T, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kChannelThreads)
    bn_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ dx,
                   T* __restrict__ dz, const acc_t<T>* __restrict__ coef, I vecs, I C, I S) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += I(gridDim.x) * blockDim.x) {
    const I e = i * V, c = NSC ? e % C : (e / S) % C;
    const Vec<T, V> dv = load_vec<V>(dy, i);
    Vec<T, V> xv{}, yv{}, gx, gz;
    if (y) yv = load_vec<V>(y, i);
    if (dx && x) xv = load_vec<V>(x, i);
    const Vec<A, V> mu = coef_vec<V, NSC>(coef, c), a = coef_vec<V, NSC>(coef + C, c),
                    kg = coef_vec<V, NSC>(coef + 2 * C, c), ev = coef_vec<V, NSC>(coef + 3 * C, c);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A g = grad_in_relu<A>(dv.v[j], y, yv.v[j]);
      gz.v[j] = static_cast<T>(g);
      const A ag = a.v[j] * (g - kg.v[j]);
      gx.v[j] = static_cast<T>(x ? ag - (static_cast<A>(xv.v[j]) - mu.v[j]) * ev.v[j] : ag);
    }
    if (dz) store_vec<V>(dz, i, gz);
    if (dx) store_vec<V>(dx, i, gx);
  }
}

struct BatchNormBackend {
  using Guard = simt::DeviceGuard;

  // Blocks for a grid that fills the device several times over.

  template <typename T, bool GRAD>
  static void reduce(const BatchNormShape& s, const at::Tensor& xc, const T* x, const T* dy, const T* y,
                     const acc_t<T>* mean, const acc_t<T>* var, acc_t<T> eps, acc_t<T>* out_a, acc_t<T>* out_b) {
    using A = acc_t<T>;
    const cudaStream_t stream = simt::current_stream();
    const auto opts = xc.options().dtype(stat_dtype(xc.scalar_type()));
    ChannelPartials p;
    if constexpr (GRAD) {
      p = channel_partials<T, true>(s.channels_last, x, dy, y, BnGradOp<A>{mean}, s.N, s.C, s.S, 1, s.count(), 1,
                                    target_blocks(xc), opts, stream);
    } else {
      p = channel_partials<T, false>(s.channels_last, x, dy, y, StatsOp{}, s.N, s.C, s.S, 1, s.count(), 1,
                                     target_blocks(xc), opts, stream);
    }
    constexpr int64_t per_block = kChannelThreads / 32;  // a warp per channel
    simt::launch(bn_finalize_kernel<T, GRAD>, dim3(ceil_div(s.C, per_block)), dim3(kChannelThreads), 0, stream,
                 p.parts<A>(), p.splits, s.C, x, s.channels_last ? int64_t(1) : s.S, var, eps, out_a, out_b);
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
    // contiguous, each channel on chip (cuda/onchip_norm.cuh): one pass; else statistics, then apply.
    // Channels-last keeps the two-pass kernels: the single-pass one in chunks of channels
    // (onchip_nsc_fwd with samples = 1) was slower on an H100 at every ResNet shape that fits
    // (256x2048x7x7: 51 % of copy in fp32, 32 % in bf16, against 55 % and 43 %).
    if (!s.channels_last && s.count() > 0 &&
        onchip_norm_fwd<T, W>(
            [&](int64_t V) { return OnchipUnits{s.C, s.N, s.S / V, s.C * s.S / V, s.C, 1, s.S / V, 0}; }, s.S,
            xc.get_device(), x, z, y, w, b, eps, act, false, mean, var))
      return;
    compose_fwd_train<BatchNormBackend, T, W>(s, xc, x, w, b, z, eps, act, y, mean, var);
  }

  template <typename T, typename W>
  static void bwd(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                  const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act act, bool training,
                  acc_t<T>* sum_g, acc_t<T>* sum_gx, T* dx, T* dz) {
    compose_bwd<BatchNormBackend, T, W>(s, xc, dy, x, y, mean, var, w, eps, act, training, sum_g, sum_gx, dx, dz);
  }

  // The [K][C] coefficient workspace of the elementwise passes (see bn_coef_kernel).
  template <typename T, typename W>
  static at::Tensor coefs(const BatchNormShape& s, const at::Tensor& xc, const acc_t<T>* mean, const acc_t<T>* var,
                          const W* w, const W* b, const acc_t<T>* k_g, const acc_t<T>* k_gx, acc_t<T> k,
                          acc_t<T> eps, bool grad) {
    using A = acc_t<T>;
    at::Tensor coef = at::empty({(grad ? 4 : 3) * s.C}, xc.options().dtype(stat_dtype(xc.scalar_type())));
    simt::launch(bn_coef_kernel<A, W>, dim3(ceil_div(s.C, kChannelThreads)), dim3(kChannelThreads), 0,
                 simt::current_stream(), mean, var, w, b, k_g, k_gx, k, eps, s.C, grad, coef.data_ptr<A>());
    return coef;
  }

  template <typename T, typename W>
  static void apply(const BatchNormShape& s, const at::Tensor& xc, const T* x, const acc_t<T>* mean,
                    const acc_t<T>* var, const W* w, const W* b, const T* z, acc_t<T> eps, Act act, T* y) {
    using A = acc_t<T>;
    const at::Tensor coef = coefs<T, W>(s, xc, mean, var, w, b, nullptr, nullptr, A(0), eps, false);
    const bool aligned = is_aligned(x, 16) && is_aligned(z, 16) && is_aligned(y, 16);
    channel_elementwise<T>(s.channels_last, s.C, s.S, s.numel(), aligned, [&](auto vw, auto nsc, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.numel() / V;
      simt::launch(bn_apply_kernel<T, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kChannelThreads),
                   0, simt::current_stream(), x, z, y, coef.data_ptr<A>(), act == Act::Relu, I(vecs), I(s.C),
                   I(s.S));
    });
  }

  template <typename T, typename W>
  static void bwd_elemt(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                        const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act, const acc_t<T>* k_g,
                        const acc_t<T>* k_gx, acc_t<T> k, T* dx, T* dz) {
    using A = acc_t<T>;
    const at::Tensor coef = coefs<T, W>(s, xc, mean, var, w, nullptr, k_g, k_gx, k, eps, true);
    if (!k_g) x = nullptr;  // eval: dx = a * g does not read x (bn_grad_kernel)
    const bool aligned = is_aligned(dy, 16) && is_aligned(x, 16) && is_aligned(y, 16) && is_aligned(dx, 16) &&
                         is_aligned(dz, 16);
    channel_elementwise<T>(s.channels_last, s.C, s.S, s.numel(), aligned, [&](auto vw, auto nsc, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.numel() / V;
      simt::launch(bn_grad_kernel<T, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kChannelThreads),
                   0, simt::current_stream(), dy, x, y, dx, dz, coef.data_ptr<A>(), I(vecs), I(s.C), I(s.S));
    });
  }
};

}  // namespace fusenorm::cuda

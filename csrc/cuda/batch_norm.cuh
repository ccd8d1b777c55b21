// CUDA BatchNorm, both layouts (common/batch_norm_ops.h).
//
// Per-channel reductions (the statistics, and the backward's sums of g and g * (x - mean)) run in
// two launches that fill the device for any shape: a partial kernel where each block reduces one
// slice of one channel (NCS: a range of 4-vector segments of the channel's N runs; NSC: a range of
// rows for a tile of channels, threads along the channels) into a [splits, C] workspace, then a
// finalize kernel that merges each channel's slices in a fixed order. No atomics: deterministic.
// Statistics merge (mean, M2, count) with Chan's formula; no E[x^2] - E[x]^2.
// The elementwise passes (apply, dx) walk x as 16-byte vectors, grid-stride, the channel of each
// vector from its index (32-bit index math when the tensor allows, else 64-bit), computing the
// per-channel coefficients on the fly from mean / var / weight / bias (L1-resident).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/batch_norm_ops.h"
#include "common/reduce.cuh"
#include "common/simt.cuh"
#include "common/vec.cuh"
#include "common/welford.h"

namespace fusenorm::cuda {

constexpr int kBnThreads = 256;

// One slice of one channel: statistics (a = mean, b = M2, n = count) or, for GRAD, the backward's
// sums (a = sum g, b = sum g * (x - mean)).
template <typename A>
struct BnPart {
  A a, b, n;
};

template <bool GRAD, typename A>
__device__ __forceinline__ void bn_merge(BnPart<A>& p, const BnPart<A>& q) {
  if constexpr (GRAD) {
    p.a += q.a;
    p.b += q.b;
  } else {
    if (q.n == A(0)) return;
    if (p.n == A(0)) {
      p = q;
      return;
    }
    const A n = p.n + q.n, d = q.a - p.a, f = q.n / n;
    p.a += d * f;
    p.b += q.b + d * d * p.n * f;
    p.n = n;
  }
}

// Lane 0 gets the warp's merge.
template <bool GRAD, typename A>
__device__ __forceinline__ BnPart<A> bn_warp_reduce(BnPart<A> p) {
  for (int o = 16; o > 0; o >>= 1) {
    const BnPart<A> q{__shfl_down_sync(kFullMask, p.a, o), __shfl_down_sync(kFullMask, p.b, o),
                      __shfl_down_sync(kFullMask, p.n, o)};
    bn_merge<GRAD>(p, q);
  }
  return p;
}

// g: dy, or 0 where the ReLU output y is not positive (never dy * 0).
template <typename A, typename T>
__device__ __forceinline__ A bn_grad_in(T dy, const T* y, T yv) {
  return (y && !(static_cast<A>(yv) > A(0))) ? A(0) : static_cast<A>(dy);
}

// NCS partials: block b reduces slice b % splits of channel b / splits. A channel is N runs of S
// values, cut into segments of `seg` values (a multiple of V); slice sp takes a contiguous range.
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kBnThreads)
    bn_reduce_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                         const acc_t<T>* __restrict__ mean, BnPart<acc_t<T>>* __restrict__ part, int64_t N,
                         int64_t C, int64_t S, int64_t splits, int64_t seg) {
  using A = acc_t<T>;
  __shared__ BnPart<A> red[32];
  const int64_t c = blockIdx.x / splits, sp = blockIdx.x % splits;
  const int64_t spp = (S + seg - 1) / seg, total = N * spp;
  const int64_t k0 = total * sp / splits, k1 = total * (sp + 1) / splits;
  const A mu = GRAD ? mean[c] : A(0);
  BnPart<A> p{A(0), A(0), A(0)};
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t n = k / spp, s0 = (k % spp) * seg, s1 = s0 + seg < S ? s0 + seg : S;
    const int64_t base = (n * C + c) * S;
    for (int64_t s = s0 + threadIdx.x * V; s < s1; s += int64_t(blockDim.x) * V) {
      const int64_t vi = (base + s) / V;
      const Vec<T, V> xv = load_vec<V>(x, vi);
      if constexpr (GRAD) {
        const Vec<T, V> dv = load_vec<V>(dy, vi);
        Vec<T, V> yv{};
        if (y) yv = load_vec<V>(y, vi);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A g = bn_grad_in<A>(dv.v[j], y, yv.v[j]);
          p.a += g;
          p.b += g * (static_cast<A>(xv.v[j]) - mu);
        }
      } else {
        A m = A(0), q = A(0);
#pragma unroll
        for (int j = 0; j < V; ++j) m += static_cast<A>(xv.v[j]);
        m /= A(V);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A d = static_cast<A>(xv.v[j]) - m;
          q += d * d;
        }
        bn_merge<false>(p, BnPart<A>{m, q, A(V)});
      }
    }
  }
  p = bn_warp_reduce<GRAD>(p);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) red[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < warps ? red[lane] : BnPart<A>{A(0), A(0), A(0)};
    p = bn_warp_reduce<GRAD>(p);
    if (lane == 0) part[sp * C + c] = p;
  }
}

// NSC partials: x is [rows, C]. Thread (tx, ty) of block (bx, sp) owns channels
// [(bx * blockDim.x + tx) * V, + V) and rows ty, ty + blockDim.y, ... of slice sp.
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kBnThreads)
    bn_reduce_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                         const acc_t<T>* __restrict__ mean, BnPart<acc_t<T>>* __restrict__ part, int64_t rows,
                         int64_t C, int64_t splits) {
  using A = acc_t<T>;
  FUSENORM_DYNAMIC_SMEM(unsigned char, smem_raw);
  BnPart<A>* sm = reinterpret_cast<BnPart<A>*>(smem_raw);  // [blockDim.y][blockDim.x][V]
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const int64_t sp = blockIdx.y, r0 = rows * sp / splits, r1 = rows * (sp + 1) / splits;
  const bool active = c0 < C;
  BnPart<A> p[V];
  A mu[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    p[j] = BnPart<A>{A(0), A(0), A(0)};
    mu[j] = (GRAD && active) ? mean[c0 + j] : A(0);
  }
  if (active) {
    A cnt = A(0);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t vi = (r * C + c0) / V;
      const Vec<T, V> xv = load_vec<V>(x, vi);
      if constexpr (GRAD) {
        const Vec<T, V> dv = load_vec<V>(dy, vi);
        Vec<T, V> yv{};
        if (y) yv = load_vec<V>(y, vi);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A g = bn_grad_in<A>(dv.v[j], y, yv.v[j]);
          p[j].a += g;
          p[j].b += g * (static_cast<A>(xv.v[j]) - mu[j]);
        }
      } else {  // Welford, one reciprocal per row for the V channels
        cnt += A(1);
        const A inv = A(1) / cnt;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A v = static_cast<A>(xv.v[j]), d = v - p[j].a;
          p[j].a += d * inv;
          p[j].b += d * (v - p[j].a);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) p[j].n = cnt;
  }
  const int64_t me = (int64_t(threadIdx.y) * blockDim.x + threadIdx.x) * V;
#pragma unroll
  for (int j = 0; j < V; ++j) sm[me + j] = p[j];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (int t = 1; t < int(blockDim.y); ++t) {
    const int64_t o = (int64_t(t) * blockDim.x + threadIdx.x) * V;
#pragma unroll
    for (int j = 0; j < V; ++j) bn_merge<GRAD>(p[j], sm[o + j]);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) part[sp * C + c0 + j] = p[j];
}

// Merges each channel's slices in order: statistics -> (mean, biased var); GRAD -> (sum g,
// sum g * xhat).
template <typename A, bool GRAD>
__global__ void __launch_bounds__(kBnThreads)
    bn_finalize_kernel(const BnPart<A>* __restrict__ part, int64_t splits, int64_t C, const A* __restrict__ var,
                       A eps, A* __restrict__ out_a, A* __restrict__ out_b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  BnPart<A> p = part[c];
  for (int64_t sp = 1; sp < splits; ++sp) bn_merge<GRAD>(p, part[sp * C + c]);
  out_a[c] = p.a;
  out_b[c] = GRAD ? p.b * simt::rsqrt(var[c] + eps) : p.b / p.n;
}

// y = act((x - mean) * rstd * w + b + z) over 16-byte vectors (V values of one channel for NCS,
// V consecutive channels for NSC).
template <typename T, typename W, int V, bool NSC, typename I>
__global__ void __launch_bounds__(kBnThreads)
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
__global__ void __launch_bounds__(kBnThreads)
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
      const A g = bn_grad_in<A>(dv.v[j], y, yv.v[j]);
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

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
  // Blocks for a grid that fills the device several times over.
  static int64_t target_blocks(const at::Tensor& x) { return int64_t(simt::device_limits(x.get_device()).sms) * 8; }

  template <typename T, bool GRAD>
  static void reduce(const BatchNormShape& s, const at::Tensor& xc, const T* x, const T* dy, const T* y,
                     const acc_t<T>* mean, const acc_t<T>* var, acc_t<T> eps, acc_t<T>* out_a, acc_t<T>* out_b) {
    using A = acc_t<T>;
    constexpr int VW = vec_width<T>();
    const cudaStream_t stream = simt::current_stream();
    const int64_t C = s.C, target = target_blocks(xc);
    const bool aligned = is_aligned(x, 16) && is_aligned(dy, 16) && is_aligned(y, 16);
    int64_t splits = 1;
    at::Tensor part;
    auto workspace = [&] {
      part = at::empty({splits * C * 3}, xc.options().dtype(stat_dtype(xc.scalar_type())));
      return reinterpret_cast<BnPart<A>*>(part.data_ptr<A>());
    };
    if (!s.channels_last) {
      auto run = [&](auto vw) {
        constexpr int V = decltype(vw)::value;
        const int64_t seg = int64_t(kBnThreads) * V * 4, per_channel = s.N * ceil_div(s.S, seg);
        splits = std::clamp<int64_t>(ceil_div(target, C), 1, per_channel);
        BnPart<A>* p = workspace();
        simt::launch(bn_reduce_ncs_kernel<T, V, GRAD>, dim3(C * splits), dim3(kBnThreads), 0, stream, x, dy, y, mean,
                     p, s.N, C, s.S, splits, seg);
      };
      if (aligned && s.S % VW == 0) {
        run(std::integral_constant<int, VW>());
      } else {
        run(std::integral_constant<int, 1>());
      }
    } else {
      const int64_t rows = s.count();
      auto run = [&](auto vw) {
        constexpr int V = decltype(vw)::value;
        const int64_t cvecs = ceil_div(C, V);
        int tx = 1;
        while (tx < 32 && tx < cvecs) tx *= 2;
        const int ty = kBnThreads / tx;
        const int64_t gx = ceil_div(cvecs, tx);
        splits = std::clamp<int64_t>(ceil_div(target, gx), 1, std::min<int64_t>(ceil_div(rows, ty), 65535));
        BnPart<A>* p = workspace();
        const int64_t smem = int64_t(kBnThreads) * V * sizeof(BnPart<A>);
        auto kernel = bn_reduce_nsc_kernel<T, V, GRAD>;
        simt::allow_dynamic_smem(kernel, smem);
        simt::launch(kernel, dim3(gx, splits), dim3(tx, ty), smem, stream, x, dy, y, mean, p, rows, C, splits);
      };
      if (aligned && C % VW == 0) {
        run(std::integral_constant<int, VW>());
      } else {
        run(std::integral_constant<int, 1>());
      }
    }
    simt::launch(bn_finalize_kernel<A, GRAD>, dim3(ceil_div(C, kBnThreads)), dim3(kBnThreads), 0, stream,
                 reinterpret_cast<const BnPart<A>*>(part.data_ptr<A>()), splits, C, var, eps, out_a, out_b);
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
    return dim3(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(vecs, kBnThreads), 1, target_blocks(xc) * 4)));
  }

  template <typename T, typename W>
  static void apply(const BatchNormShape& s, const at::Tensor& xc, const T* x, const acc_t<T>* mean,
                    const acc_t<T>* var, const W* w, const W* b, const T* z, acc_t<T> eps, Act act, T* y) {
    const bool aligned = is_aligned(x, 16) && is_aligned(z, 16) && is_aligned(y, 16);
    elementwise<T>(s, aligned, [&](auto vw, auto nsc, auto ix) {
      constexpr int V = decltype(vw)::value;
      using I = decltype(ix);
      const int64_t vecs = s.numel() / V;
      simt::launch(bn_apply_kernel<T, W, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kBnThreads), 0,
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
      simt::launch(bn_grad_kernel<T, W, V, decltype(nsc)::value, I>, elementwise_grid(xc, vecs), dim3(kBnThreads), 0,
                   simt::current_stream(), dy, x, y, dx, dz, mean, var, w, k_g, k_gx, k, eps, I(vecs), I(s.C),
                   I(s.S));
    });
  }
};

}  // namespace fusenorm::cuda

// Per-channel partial reductions over [N, C, S]-shaped data, shared by BatchNorm (statistics and
// backward sums per channel) and GroupNorm (statistics per (sample, channel), merged into groups).
//
// Each block reduces one slice of one "channel" into a ChanPart of a workspace; the caller's
// finalize kernel merges the slices of each channel in a fixed order. No atomics: deterministic.
//   NCS: `C` runs per sample of S contiguous values (channel c = N runs at stride C * S). Block b
//        takes slice b % splits of channel b / splits: a range of the vectors of its runs.
//        part[sp * C + c].
//   NSC: x is [batches][rows][C]. Block (bx, sp, z) owns a tile of channels (threads along C,
//        V per thread) and slice sp of the rows of batch z. part[(z * splits + sp) * C + c].
// Statistics are taken relative to a pivot value per channel group (its first value) and merge
// (mean, M2, count) with Chan's formula; GRAD sums the two terms an Op gives per element
// (BatchNorm: g and g * (x - mean); GroupNorm: dz and dz * xhat). chan_warp_merge is the finalize
// kernels' ordered merge.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/reduce.cuh"
#include "common/simt.cuh"
#include "common/vec.cuh"
#include "common/welford.h"

namespace fusenorm::cuda {

constexpr int kChannelThreads = 256;

// One slice of one channel: statistics (a = mean, b = M2, n = count) or, for GRAD, the backward's
// sums (a = sum g, b = sum g * (x - mean)).
template <typename A>
struct ChanPart {
  A a, b, n;
};

template <bool GRAD, typename A>
__device__ __forceinline__ void chan_merge(ChanPart<A>& p, const ChanPart<A>& q) {
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
    p.a = merged_mean(p.a, q.a, d, p.n, n, f);
    p.b += q.b + d * d * p.n * f;
    p.n = n;
  }
}

// Lane 0 gets the warp's merge.
template <bool GRAD, typename A>
__device__ __forceinline__ ChanPart<A> chan_warp_reduce(ChanPart<A> p) {
  for (int o = 16; o > 0; o >>= 1) {
    const ChanPart<A> q{__shfl_down_sync(kFullMask, p.a, o), __shfl_down_sync(kFullMask, p.b, o),
                      __shfl_down_sync(kFullMask, p.n, o)};
    chan_merge<GRAD>(p, q);
  }
  return p;
}

// g: dy, or 0 where the ReLU output y <= 0 (never dy * 0; NaN y passes dy, as torch's threshold_backward).
template <typename A, typename T>
__device__ __forceinline__ A grad_in_relu(T dy, const T* y, T yv) {
  return (y && static_cast<A>(yv) <= A(0)) ? A(0) : static_cast<A>(dy);
}

// What the GRAD partials sum, per element: an Op gives a context for channel k of batch z (NCS:
// k is the run index, z = 0) and from it adds g to a and g * xc to b.
// BatchNorm: g = dy, masked by y > 0 with ReLU; xc = x - mean[k].
template <typename A>
struct BnGradOp {
  const A* mean;
  struct Ctx {
    A mu;
  };
  __device__ __forceinline__ Ctx ctx(int64_t k, int64_t) const { return {mean[k]}; }
  template <typename T>
  __device__ __forceinline__ void add(const Ctx& c, T x, T dy, const T* y, T yv, A& a, A& b) const {
    const A g = grad_in_relu<A>(dy, y, yv);
    a += g;
    b += g * (static_cast<A>(x) - c.mu);
  }
};

// The statistics partials need no op.
struct StatsOp {
  struct Ctx {};
  __device__ __forceinline__ Ctx ctx(int64_t, int64_t) const { return {}; }
};

// NCS partials: channel c (of C) is N runs of S values at stride C * S, seen as N * S / V vectors
// (V divides S); block b reduces slice b % splits, a contiguous range of those vectors, of channel
// b / splits. Statistics are taken relative to the channel's pivot (the first value of channel
// (c / pgrp) * pgrp), so that a large mean does not cost precision: finalize adds it back.
template <typename T, int V, bool GRAD, typename I, typename Op>
__global__ void __launch_bounds__(kChannelThreads)
    channel_reduce_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, Op op,
                              ChanPart<acc_t<T>>* __restrict__ part, I N, I C, I S, I splits, I pgrp) {
  using A = acc_t<T>;
  __shared__ ChanPart<A> red[32];
  const I c = blockIdx.x / splits, sp = blockIdx.x % splits;
  const I sv = S / V;
  const int64_t total = int64_t(N) * sv;
  const I v0 = static_cast<I>(total * sp / splits), v1 = static_cast<I>(total * (sp + 1) / splits);
  const typename Op::Ctx cx = op.ctx(c, 0);
  const A mu = GRAD ? A(0) : pivot_of(static_cast<A>(x[(c / pgrp) * pgrp * S]));  // the pivot
  ChanPart<A> p{A(0), A(0), A(0)};
  for (I v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const I n = v / sv, vi = (n * C + c) * sv + (v - n * sv);
    const Vec<T, V> xv = load_vec<V>(x, vi);
    if constexpr (GRAD) {
      const Vec<T, V> dv = load_vec<V>(dy, vi);
      Vec<T, V> yv{};
      if (y) yv = load_vec<V>(y, vi);
#pragma unroll
      for (int j = 0; j < V; ++j) op.add(cx, xv.v[j], dv.v[j], y, yv.v[j], p.a, p.b);
    } else {
      A m = A(0), q = A(0);
#pragma unroll
      for (int j = 0; j < V; ++j) m += static_cast<A>(xv.v[j]) - mu;
      m /= A(V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = (static_cast<A>(xv.v[j]) - mu) - m;
        q += d * d;
      }
      chan_merge<false>(p, ChanPart<A>{m, q, A(V)});
    }
  }
  p = chan_warp_reduce<GRAD>(p);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) red[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < warps ? red[lane] : ChanPart<A>{A(0), A(0), A(0)};
    p = chan_warp_reduce<GRAD>(p);
    if (lane == 0) part[int64_t(sp) * C + c] = p;
  }
}

// NSC partials: x is [batches][rows][C]. Thread (tx, ty) of block (bx, sp, z) owns channels
// [(bx * blockDim.x + tx) * V, + V) and rows ty, ty + blockDim.y, ... of slice sp of batch z.
// Statistics relative to the pivot x[z][0][(c / pgrp) * pgrp], as above.
template <typename T, int V, bool GRAD, typename Op>
__global__ void __launch_bounds__(kChannelThreads)
    channel_reduce_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, Op op,
                              ChanPart<acc_t<T>>* __restrict__ part, int64_t rows, int64_t C, int64_t splits,
                              int64_t pgrp) {
  using A = acc_t<T>;
  FUSENORM_DYNAMIC_SMEM(unsigned char, smem_raw);
  ChanPart<A>* sm = reinterpret_cast<ChanPart<A>*>(smem_raw);  // [blockDim.y][blockDim.x][V]
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const int64_t sp = blockIdx.y, r0 = rows * sp / splits, r1 = rows * (sp + 1) / splits;
  const bool active = c0 < C;
  const int64_t batch = int64_t(blockIdx.z) * rows * C;  // x, dy, y of batch z
  x += batch;
  if (GRAD) {
    dy += batch;
    if (y) y += batch;
  }
  part += int64_t(blockIdx.z) * splits * C;
  ChanPart<A> p[V];
  A mu[V];  // the pivots
  typename Op::Ctx cx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    p[j] = ChanPart<A>{A(0), A(0), A(0)};
    mu[j] = (!active || GRAD) ? A(0) : pivot_of(static_cast<A>(x[((c0 + j) / pgrp) * pgrp]));
    if (active) cx[j] = op.ctx(c0 + j, blockIdx.z);
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
        for (int j = 0; j < V; ++j) op.add(cx[j], xv.v[j], dv.v[j], y, yv.v[j], p[j].a, p[j].b);
      } else {  // Welford, one reciprocal per row for the V channels
        cnt += A(1);
        const A inv = A(1) / cnt;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A v = static_cast<A>(xv.v[j]) - mu[j], d = v - p[j].a;
          p[j].a = added_mean(p[j].a, v, d, inv);
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
    for (int j = 0; j < V; ++j) chan_merge<GRAD>(p[j], sm[o + j]);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) part[sp * C + c0 + j] = p[j];
}

// Lane 0 gets the merge of parts[first + k * stride(k)] for k < count, where the k-th part is
// at(k): lanes stride the parts, then the warp merges (a fixed order: deterministic).
template <bool GRAD, typename A, typename At>
__device__ __forceinline__ ChanPart<A> chan_warp_merge(int64_t count, At at) {
  ChanPart<A> p{A(0), A(0), A(0)};
  for (int64_t k = threadIdx.x & 31; k < count; k += 32) chan_merge<GRAD>(p, at(k));
  return chan_warp_reduce<GRAD>(p);
}

struct ChannelPartials {
  at::Tensor workspace;  // keeps the ChanParts alive
  int64_t splits = 1;
  template <typename A>
  const ChanPart<A>* parts() const {
    return reinterpret_cast<const ChanPart<A>*>(workspace.data_ptr<A>());
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks that fill x's device several times over: the slice count target of channel_partials.
inline int64_t target_blocks(const at::Tensor& x) { return int64_t(simt::device_limits(x.get_device()).sms) * 8; }

// Blocks of kChannelThreads for a grid-stride pass over `vecs` vectors.
inline dim3 elementwise_grid(const at::Tensor& x, int64_t vecs) {
  return dim3(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(vecs, kChannelThreads), 1, target_blocks(x) * 4)));
}

// An elementwise pass over [N, C, S] data in either layout: runs f(V, NSC, I) with the widest
// vector the alignment allows whose values share a channel (NCS: V divides S) or a row (NSC: V
// divides C), as integral constants, and the narrowest index type I that holds numel.
template <typename T, typename F>
void channel_elementwise(bool nsc, int64_t C, int64_t S, int64_t numel, bool aligned, F&& f) {
  constexpr int VW = vec_width<T>();
  auto by_index = [&](auto vw, auto layout) {
    if (numel < (int64_t(1) << 31)) {
      f(vw, layout, uint32_t(0));
    } else {
      f(vw, layout, int64_t(0));
    }
  };
  auto by_layout = [&](auto vw) {
    if (nsc) {
      by_index(vw, std::true_type());
    } else {
      by_index(vw, std::false_type());
    }
  };
  if (aligned && (nsc ? C : S) % VW == 0) {
    by_layout(std::integral_constant<int, VW>());
  } else {
    by_layout(std::integral_constant<int, 1>());
  }
}

// Launches the partial kernel for either layout, with as many slices per channel as fill the
// device (`target` blocks, each with a few vectors per thread at least) and 16-byte vectors where
// the layout and alignment allow. pgrp: channels that share a pivot (1 for BatchNorm, the group
// size for GroupNorm).
//   NCS: N runs of S values per channel, C channels.    NSC: `batches` x [rows, C].
template <typename T, bool GRAD, typename Op>
ChannelPartials channel_partials(bool nsc, const T* x, const T* dy, const T* y, Op op, int64_t N,
                                 int64_t C, int64_t S, int64_t batches, int64_t rows, int64_t pgrp, int64_t target,
                                 const at::TensorOptions& acc_options, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VW = vec_width<T>();
  const bool aligned = is_aligned(x, 16) && is_aligned(dy, 16) && is_aligned(y, 16);
  ChannelPartials out;
  auto workspace = [&](int64_t parts) {
    out.workspace = at::empty({parts * 3}, acc_options);
    return reinterpret_cast<ChanPart<A>*>(out.workspace.template data_ptr<A>());
  };
  if (!nsc) {
    auto run = [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const int64_t vecs = N * (S / V);
      out.splits = std::clamp<int64_t>(ceil_div(target, C), 1, ceil_div(vecs, int64_t(kChannelThreads) * 4));
      ChanPart<A>* p = workspace(out.splits * C);
      auto go = [&](auto ix) {
        using I = decltype(ix);
        simt::launch(channel_reduce_ncs_kernel<T, V, GRAD, I, Op>, dim3(C * out.splits), dim3(kChannelThreads), 0,
                     stream, x, dy, y, op, p, I(N), I(C), I(S), I(out.splits), I(pgrp));
      };
      if (N * C * S < (int64_t(1) << 31)) {
        go(uint32_t(0));
      } else {
        go(int64_t(0));
      }
    };
    if (aligned && S % VW == 0) {
      run(std::integral_constant<int, VW>());
    } else {
      run(std::integral_constant<int, 1>());
    }
    return out;
  }
  auto run = [&](auto vw) {
    constexpr int V = decltype(vw)::value;
    const int64_t cvecs = ceil_div(C, V);
    int tx = 1;
    while (tx < 32 && tx < cvecs) tx *= 2;
    const int ty = kChannelThreads / tx;
    const int64_t gx = ceil_div(cvecs, tx);
    out.splits = std::clamp<int64_t>(ceil_div(target, gx * batches), 1, std::min<int64_t>(ceil_div(rows, ty * 8), 65535));
    ChanPart<A>* p = workspace(batches * out.splits * C);
    const int64_t smem = int64_t(kChannelThreads) * V * sizeof(ChanPart<A>);
    auto kernel = channel_reduce_nsc_kernel<T, V, GRAD, Op>;
    simt::allow_dynamic_smem(kernel, smem);
    simt::launch(kernel, dim3(gx, out.splits, batches), dim3(tx, ty), smem, stream, x, dy, y, op, p, rows, C,
                 out.splits, pgrp);
  };
  if (aligned && C % VW == 0) {
    run(std::integral_constant<int, VW>());
  } else {
    run(std::integral_constant<int, 1>());
  }
  return out;
}

}  // namespace fusenorm::cuda

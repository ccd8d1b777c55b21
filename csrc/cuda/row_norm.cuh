// CUDA LayerNorm / RMSNorm over rows of a [M, N] view (RMS = true drops the mean and the bias).
//
// Forward, chosen by row length (row_norm_forward below):
//  * register path: G threads per row (a sub-warp, a warp, or a whole block) each holding K
//    16-byte vectors of the row in registers; x is read from DRAM once, the statistics are an exact
//    two-pass over the registers, then y is written.
//  * shared-memory path: a block per row, the row cached in dynamic shared memory as fp32; any
//    alignment, any length that fits (~56K fp32 elements on an H100).
//  * global path: beyond that, the block re-reads the row (from L2) for each pass.
// Backward: dx from one read of x and dy per row; dweight/dbias as per-block fp32 partials in a
// [blocks, N] buffer, summed by column_sum_kernel in a fixed order: deterministic, no atomics.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "common/dispatch.h"
#include "common/reduce.cuh"
#include "common/row_norm_args.h"
#include "common/row_norm_ops.h"
#include "common/simt.cuh"
#include "common/vec.cuh"
#include "common/welford.h"

namespace fusenorm::cuda {

using simt::rsqrt;
// dy * w rounded once, never contracted into an FMA: the backward computes it twice (for the row
// sums and for dx), and the two must agree bit for bit or g - mean(g) stops cancelling exactly.
using simt::mul_rn;

// Threads per block for a kernel with G threads per row.
constexpr int block_threads(int G) { return G < 128 ? 128 : G; }

// ---------------------------------------------------------------------------------------------
// Forward, register path.
template <typename T, typename W, bool RMS, int G, int K>
__global__ void __launch_bounds__(block_threads(G))
    row_norm_fwd_reg_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                            const W* __restrict__ b, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd,
                            int64_t M, int64_t N, acc_t<T> eps) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  constexpr int R = block_threads(G) / G;  // rows per block
  __shared__ A red[32];
  const int lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * R + threadIdx.x / G;
  const bool active = row < M;  // inactive lanes still join the shuffles
  const int64_t nvec = N / V;
  const T* xr = x + row * N;
  A shift = A(0);

  A v[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t vi = static_cast<int64_t>(k) * G + lane;
    if (active && vi < nvec) {
      const Vec<T, V> t = load_vec<V>(xr, vi);
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = static_cast<A>(t.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = A(0);
    }
  }
  // Statistics of v - c with the pivot c = x[row, 0] (pivot_of; see the CPU kernel): v is shifted in place.
  A mu = A(0);
  if constexpr (!RMS) {
    const A c = active ? pivot_of(static_cast<A>(xr[0])) : A(0);
    A s = A(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (static_cast<int64_t>(k) * G + lane < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          v[k][j] -= c;
          s += v[k][j];
        }
      }
    }
    mu = row_allsum<G>(s, red) / static_cast<A>(N);
    shift = c;
  }
  A q = A(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (static_cast<int64_t>(k) * G + lane < nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = v[k][j] - mu;
        q += d * d;
      }
    }
  }
  const A rs = rsqrt(row_allsum<G>(q, red) / static_cast<A>(N) + eps);
  if (!active) return;
  T* yr = y + row * N;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t vi = static_cast<int64_t>(k) * G + lane;
    if (vi < nvec) {
      Vec<W, V> wv, bv;
      if (w) wv = load_vec<V>(w, vi);
      if (b) bv = load_vec<V>(b, vi);
      Vec<T, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A t = (v[k][j] - mu) * rs;
        if (w) t *= static_cast<A>(wv.v[j]);
        if (b) t += static_cast<A>(bv.v[j]);
        o.v[j] = static_cast<T>(t);
      }
      store_vec<V>(yr, vi, o);
    }
  }
  if (lane == 0) {
    if constexpr (!RMS) mean[row] = shift + mu;
    rstd[row] = rs;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, block-per-row path for any alignment and length; CACHE keeps the row in shared memory.
constexpr int kRowBlock = 512;

template <typename T, typename W, bool RMS, bool CACHE>
__global__ void __launch_bounds__(kRowBlock)
    row_norm_fwd_block_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                              const W* __restrict__ b, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd,
                              int64_t M, int64_t N, acc_t<T> eps) {
  using A = acc_t<T>;
  FUSENORM_DYNAMIC_SMEM(unsigned char, smem_raw);
  A* cache = reinterpret_cast<A*>(smem_raw);
  __shared__ A red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * N;
  // Each thread touches the same indices in every pass, so the cache needs no barrier.
  // pivot c = x[row, 0], as in the register kernel; the cache holds x - c
  const A c = RMS ? A(0) : pivot_of(static_cast<A>(xr[0]));
  A mu = A(0);
  if constexpr (!RMS) {
    A s = A(0);
    for (int64_t i = threadIdx.x; i < N - FUSENORM_PLANTED(3); i += blockDim.x) {  // planted: drops the last
      const A a = static_cast<A>(xr[i]) - c;
      if constexpr (CACHE) cache[i] = a;
      s += a;
    }
    mu = block_allsum(s, red) / static_cast<A>(N);
  }
  A q = A(0);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    A a;
    if constexpr (CACHE && !RMS) {
      a = cache[i];
    } else {
      a = static_cast<A>(xr[i]) - c;
      if constexpr (CACHE) cache[i] = a;
    }
    q += (a - mu) * (a - mu);
  }
  const A rs = rsqrt(block_allsum(q, red) / static_cast<A>(N) + eps);
  T* yr = y + row * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A a = CACHE ? cache[i] : static_cast<A>(xr[i]) - c;
    A t = (a - mu) * rs;
    if (w) t *= static_cast<A>(w[i]);
    if (b) t += static_cast<A>(b[i]);
    yr[i] = static_cast<T>(t);
  }
  if (threadIdx.x == 0) {
    if constexpr (!RMS) mean[row] = c + mu;
    rstd[row] = rs;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, register path. Each block walks rows R at a time (grid-stride), so its threads keep
// their columns: dweight/dbias accumulate in registers and are written once per block.
template <typename T, typename W, bool RMS, int G, int K>
__global__ void __launch_bounds__(block_threads(G))
    row_norm_bwd_reg_kernel(const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ mean,
                            const acc_t<T>* __restrict__ rstd, const W* __restrict__ w, T* __restrict__ dx,
                            acc_t<T>* __restrict__ part_w, acc_t<T>* __restrict__ part_b, int64_t M, int64_t N) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  constexpr int R = block_threads(G) / G;
  __shared__ A red[32];
  FUSENORM_DYNAMIC_SMEM(unsigned char, smem_raw);  // R > 1: 2 * N accumulators to merge the block's rows
  const int lane = threadIdx.x % G;
  const int sub = threadIdx.x / G;
  const int64_t nvec = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  A dwa[K][V], dba[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) dwa[k][j] = dba[k][j] = A(0);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * R; base < M; base += static_cast<int64_t>(gridDim.x) * R) {
    const int64_t row = base + sub;
    const bool active = row < M;
    A xv[K][V], gv[K][V];
    const A mu = (!RMS && active) ? mean[row] : A(0);
    const A rs = active ? rstd[row] : A(0);
    A s_g = A(0), s_gx = A(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t vi = static_cast<int64_t>(k) * G + lane;
      if (active && vi < nvec) {
        const Vec<T, V> tx = load_vec<V>(x + row * N, vi);
        const Vec<T, V> td = load_vec<V>(dy + row * N, vi);
        Vec<W, V> wv;
        if (w) wv = load_vec<V>(w, vi);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          xv[k][j] = (static_cast<A>(tx.v[j]) - mu) * rs;  // xhat
          gv[k][j] = static_cast<A>(td.v[j]);              // dy
          const A g = w ? mul_rn(gv[k][j], static_cast<A>(wv.v[j])) : gv[k][j];
          s_g += g;
          s_gx += g * xv[k][j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xv[k][j] = gv[k][j] = A(0);
      }
    }
    if constexpr (!RMS) s_g = row_allsum<G>(s_g, red);
    s_gx = row_allsum<G>(s_gx, red);
    const A a = RMS ? A(0) : s_g * inv_n;
    const A c = s_gx * inv_n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t vi = static_cast<int64_t>(k) * G + lane;
      if (active && vi < nvec) {
        Vec<W, V> wv;
        if (w) wv = load_vec<V>(w, vi);
        Vec<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A g = w ? mul_rn(gv[k][j], static_cast<A>(wv.v[j])) : gv[k][j];
          o.v[j] = static_cast<T>(rs * (g - a - xv[k][j] * c));
          dwa[k][j] += gv[k][j] * xv[k][j];
          dba[k][j] += gv[k][j];
        }
        if (dx) store_vec<V>(dx + row * N, vi, o);
      }
    }
  }
  if (!part_w && !part_b) return;
  if constexpr (R == 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t vi = static_cast<int64_t>(k) * G + lane;
      if (vi < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t col = vi * V + j;
          if (part_w) part_w[blockIdx.x * N + col] = dwa[k][j];
          if (part_b) part_b[blockIdx.x * N + col] = dba[k][j];
        }
      }
    }
  } else {
    // Merge the R row-groups in a fixed order through shared memory.
    A* sw = reinterpret_cast<A*>(smem_raw);
    A* sb = sw + N;
    for (int r = 0; r < R; ++r) {
      if (sub == r) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t vi = static_cast<int64_t>(k) * G + lane;
          if (vi < nvec) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const int64_t col = vi * V + j;
              sw[col] = (r == 0 ? A(0) : sw[col]) + dwa[k][j];
              sb[col] = (r == 0 ? A(0) : sb[col]) + dba[k][j];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
      if (part_w) part_w[blockIdx.x * N + col] = sw[col];
      if (part_b) part_b[blockIdx.x * N + col] = sb[col];
    }
  }
}

// Backward, block-per-row path for any alignment and length. Partials are owned column-wise by
// the same thread in every row, so the read-modify-write of part_* needs no synchronisation.
template <typename T, typename W, bool RMS>
__global__ void __launch_bounds__(kRowBlock)
    row_norm_bwd_block_kernel(const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ mean,
                              const acc_t<T>* __restrict__ rstd, const W* __restrict__ w, T* __restrict__ dx,
                              acc_t<T>* __restrict__ part_w, acc_t<T>* __restrict__ part_b, int64_t M, int64_t N) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const A inv_n = A(1) / static_cast<A>(N);
  bool first = true;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * N;
    const T* dr = dy + row * N;
    const A mu = RMS ? A(0) : mean[row];
    const A rs = rstd[row];
    A s_g = A(0), s_gx = A(0);
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const A g = w ? mul_rn(static_cast<A>(dr[i]), static_cast<A>(w[i])) : static_cast<A>(dr[i]);
      s_g += g;
      s_gx += g * (static_cast<A>(xr[i]) - mu) * rs;
    }
    if constexpr (!RMS) s_g = block_allsum(s_g, red);
    s_gx = block_allsum(s_gx, red);
    const A a = RMS ? A(0) : s_g * inv_n;
    const A c = s_gx * inv_n;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const A d = static_cast<A>(dr[i]);
      const A xhat = (static_cast<A>(xr[i]) - mu) * rs;
      const A g = w ? mul_rn(d, static_cast<A>(w[i])) : d;
      if (dx) dx[row * N + i] = static_cast<T>(rs * (g - a - xhat * c));
      if (part_w) part_w[blockIdx.x * N + i] = (first ? A(0) : part_w[blockIdx.x * N + i]) + d * xhat;
      if (part_b) part_b[blockIdx.x * N + i] = (first ? A(0) : part_b[blockIdx.x * N + i]) + d;
    }
    first = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.
// Row lengths (in elements) the register paths cover with each (G, K); K counts 16-byte vectors.
// Calls f(std::integral_constant<int, G>, std::integral_constant<int, K>) and returns true, or
// returns false when the row is too long for registers.
template <typename T, typename F>
bool pick_fwd_config(int64_t N, F&& f) {
  constexpr int V = vec_width<T>();
  constexpr int K8 = 8 / V > 0 ? 8 / V : 1;  // 8 elements per thread
  constexpr int K16 = 16 / V;
  using std::integral_constant;
  if (N <= 8 * 8) return f(integral_constant<int, 8>{}, integral_constant<int, K8>{}), true;
  if (N <= 32 * 8) return f(integral_constant<int, 32>{}, integral_constant<int, K8>{}), true;
  if (N <= 32 * 32) return f(integral_constant<int, 32>{}, integral_constant<int, 32 / V>{}), true;
  if (N <= 128 * 16) return f(integral_constant<int, 128>{}, integral_constant<int, K16>{}), true;
  if (N <= 256 * 16) return f(integral_constant<int, 256>{}, integral_constant<int, K16>{}), true;
  if (N <= 512 * 16) return f(integral_constant<int, 512>{}, integral_constant<int, K16>{}), true;
  if (N <= 1024 * 16) return f(integral_constant<int, 1024>{}, integral_constant<int, K16>{}), true;
  return false;
}

template <typename T, typename F>
bool pick_bwd_config(int64_t N, F&& f) {
  constexpr int V = vec_width<T>();
  constexpr int K8 = 8 / V;
  constexpr int K16 = 16 / V;
  using std::integral_constant;
  if (N <= 8 * 8) return f(integral_constant<int, 8>{}, integral_constant<int, K8>{}), true;
  if (N <= 32 * 8) return f(integral_constant<int, 32>{}, integral_constant<int, K8>{}), true;
  if (N <= 32 * 16) return f(integral_constant<int, 32>{}, integral_constant<int, K16>{}), true;
  if (N <= 128 * 8) return f(integral_constant<int, 128>{}, integral_constant<int, K8>{}), true;
  if (N <= 256 * 8) return f(integral_constant<int, 256>{}, integral_constant<int, K8>{}), true;
  if (N <= 512 * 8) return f(integral_constant<int, 512>{}, integral_constant<int, K8>{}), true;
  if (N <= 512 * 16) return f(integral_constant<int, 512>{}, integral_constant<int, K16>{}), true;
  return false;
}

// The vectorized register path needs N % V == 0 and every pointer aligned to its vector.
template <typename T, typename W>
bool can_vectorize(int64_t N, const void* a, const void* b, const void* w, const void* bias) {
  constexpr int V = vec_width<T>();
  if constexpr (FUSENORM_PLANTED(4)) return N % V == 0;  // planted: alignment not checked
  return N % V == 0 && is_aligned(a, 16) && is_aligned(b, 16) && is_aligned(w, sizeof(W) * V) &&
         is_aligned(bias, sizeof(W) * V);
}

template <typename T, typename W, bool RMS>
void launch_fwd(const T* x, T* y, const W* w, const W* b, acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N,
                double eps_d, int dev, cudaStream_t stream) {
  using A = acc_t<T>;
  const A eps = static_cast<A>(eps_d);
  if (can_vectorize<T, W>(N, x, y, w, b) &&
      pick_fwd_config<T>(N, [&](auto g, auto k) {
        constexpr int G = decltype(g)::value, K = decltype(k)::value;
        constexpr int R = block_threads(G) / G;
        simt::launch(row_norm_fwd_reg_kernel<T, W, RMS, G, K>, dim3((M + R - 1) / R), dim3(block_threads(G)), 0,
                     stream, x, y, w, b, mean, rstd, M, N, eps);
      })) {
    return;
  }
  const int64_t smem = N * static_cast<int64_t>(sizeof(A));
  if (smem <= simt::device_limits(dev).smem_optin) {
    auto kernel = row_norm_fwd_block_kernel<T, W, RMS, true>;
    simt::allow_dynamic_smem(kernel, smem);
    simt::launch(kernel, dim3(M), dim3(kRowBlock), smem, stream, x, y, w, b, mean, rstd, M, N, eps);
  } else {
    simt::launch(row_norm_fwd_block_kernel<T, W, RMS, false>, dim3(M), dim3(kRowBlock), 0, stream, x, y, w, b, mean,
                 rstd, M, N, eps);
  }
}

template <typename T, typename W, bool RMS>
void launch_bwd(const T* dy, const T* x, const acc_t<T>* mean, const acc_t<T>* rstd, const W* w, T* dx, W* dw,
                W* db, int64_t M, int64_t N, int dev, cudaStream_t stream, const at::TensorOptions& acc_opts) {
  using A = acc_t<T>;
  const int sms = simt::device_limits(dev).sms;
  at::Tensor part_w_t, part_b_t;
  int64_t blocks = 0;
  // As many blocks as fit on the device at once (each walks rows grid-stride), one partial row each.
  auto size_grid = [&](auto kernel, int threads, int64_t smem, int64_t max_blocks) {
    const int per_sm = simt::max_active_blocks(kernel, threads, smem);
    blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
    if (dw) part_w_t = at::empty({blocks, N}, acc_opts);
    if (db) part_b_t = at::empty({blocks, N}, acc_opts);
  };
  auto pw = [&] { return dw ? part_w_t.data_ptr<A>() : nullptr; };
  auto pb = [&] { return db ? part_b_t.data_ptr<A>() : nullptr; };
  const bool vec = can_vectorize<T, W>(N, x, dy, w, nullptr) && is_aligned(dx, 16);
  if (!(vec && pick_bwd_config<T>(N, [&](auto g, auto k) {
          constexpr int G = decltype(g)::value, K = decltype(k)::value;
          constexpr int R = block_threads(G) / G;
          auto kernel = row_norm_bwd_reg_kernel<T, W, RMS, G, K>;
          const int64_t smem = (R > 1 && (dw || db)) ? 2 * N * static_cast<int64_t>(sizeof(A)) : 0;
          size_grid(kernel, block_threads(G), smem, (M + R - 1) / R);
          simt::launch(kernel, dim3(blocks), dim3(block_threads(G)), smem, stream, dy, x, mean, rstd, w, dx, pw(),
                       pb(), M, N);
        }))) {
    auto kernel = row_norm_bwd_block_kernel<T, W, RMS>;
    size_grid(kernel, kRowBlock, 0, M);
    simt::launch(kernel, dim3(blocks), dim3(kRowBlock), 0, stream, dy, x, mean, rstd, w, dx, pw(), pb(), M, N);
  }
  const int64_t cgrid = (N + 31) / 32;
  if (dw) simt::launch(column_sum_kernel<A, W>, dim3(cgrid), dim3(32, 16), 0, stream, pw(), blocks, N, dw);
  if (db) simt::launch(column_sum_kernel<A, W>, dim3(cgrid), dim3(32, 16), 0, stream, pb(), blocks, N, db);
}

// The backend that common/row_norm_ops.h wraps into ops.
struct Backend {
  using Guard = simt::DeviceGuard;

  template <typename T, typename W, bool RMS>
  static void fwd(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias, int64_t M, int64_t N,
                  double eps, at::Tensor& y, at::Tensor* mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    at::Tensor wk, bk;
    launch_fwd<T, W, RMS>(x.data_ptr<T>(), y.data_ptr<T>(), param_ptr<W>(weight, wk), param_ptr<W>(bias, bk),
                          mean ? mean->data_ptr<A>() : nullptr, rstd.data_ptr<A>(), M, N, eps, x.get_device(),
                          simt::current_stream());
  }

  template <typename T, typename W, bool RMS>
  static void bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* mean, const at::Tensor& rstd,
                  const at::Tensor* weight, int64_t M, int64_t N, bool want_dx, bool want_dw, bool want_db,
                  at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
    using A = acc_t<T>;
    at::Tensor wk;
    launch_bwd<T, W, RMS>(dy.data_ptr<T>(), x.data_ptr<T>(), mean ? mean->data_ptr<A>() : nullptr,
                          rstd.data_ptr<A>(), param_ptr<W>(weight, wk), want_dx ? dx.data_ptr<T>() : nullptr,
                          want_dw ? dw.data_ptr<W>() : nullptr, want_db ? db.data_ptr<W>() : nullptr, M, N,
                          x.get_device(), simt::current_stream(), rstd.options());
  }
};

}  // namespace fusenorm::cuda

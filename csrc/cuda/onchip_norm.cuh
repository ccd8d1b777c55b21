// The single-pass training forward of BatchNorm (contiguous layout) and GroupNorm/InstanceNorm
// (both layouts), for tensors whose every normalization unit fits in the shared memory of a few
// blocks. onchip_norm_fwd_kernel takes the contiguous layout (below); onchip_nsc_fwd_kernel the
// channels-last one, in the same three steps.
//
// A unit (a BatchNorm channel, a GroupNorm (n, group)) is R runs of L contiguous values, run r
// starting at unit * L + r * run_stride: BatchNorm, N runs of S values at stride C * S; GroupNorm,
// one run of cpg * S values. One cluster of K blocks (sm_90 thread block clusters; K = 1 on older
// devices) holds one unit in shared memory, each block a contiguous share of its vectors:
//   1. each block loads its share once and sums x - pivot (the unit's first value, so that a large
//      mean costs no precision); the cluster adds the K block sums in rank order through
//      distributed shared memory: the mean;
//   2. from shared memory, the sum of squared deviations from that mean, merged the same way (the
//      exact two-pass variance, no E[x^2] - E[x]^2);
//   3. each block normalizes its share from shared memory and writes y.
// x is read from memory once and y written once, a copy's traffic, where the two-pass kernels
// (batch_norm.cuh, group_norm.cuh) read x twice. Deterministic: fixed summation orders, no atomics.
// onchip_plan says whether a tensor fits (FUSENORM_ONCHIP_BYTES sets the shared memory a block
// may use; 0 turns the path off); otherwise the two-pass kernels run.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "common/activation.h"
#include "common/channel_reduce.cuh"
#include "common/reduce.cuh"
#include "common/simt.cuh"
#include "common/vec.cuh"

namespace fusenorm::cuda {

constexpr int kOnchipMaxThreads = 512;

// n / d for 0 <= n < 2^31 as a multiply and a shift (Granlund-Montgomery, exact in that range):
// the kernel divides every vector's index by the run and channel lengths.
struct FastDiv {
  uint32_t m = 1u << 31, s = 31;
  FastDiv() = default;
  explicit FastDiv(int64_t d) {
    uint32_t l = 0;
    while ((int64_t(1) << l) < d) ++l;
    s = 31 + l;
    m = static_cast<uint32_t>(((uint64_t(1) << s) + uint64_t(d) - 1) / uint64_t(d));
  }
  __device__ __forceinline__ int operator()(int n) const {
    return static_cast<int>((uint64_t(static_cast<uint32_t>(n)) * m) >> s);
  }
};

// Where the units are, in vectors of V values (V divides L and run_stride).
struct OnchipUnits {
  int64_t units;       // units in the tensor
  int64_t runs;        // R
  int64_t run_vecs;    // L / V
  int64_t run_stride;  // between runs of a unit, in vectors
  int64_t groups;      // the unit's channels: (unit % groups) * cpg + (offset in run) / chan_vecs
  int64_t cpg;
  int64_t chan_vecs;   // S / V
  int64_t per_block;   // capacity of a block's share, in vectors
  FastDiv by_run, by_chan;  // / run_vecs, / chan_vecs (set by onchip_plan)
};

// The dynamic shared memory of the kernel, one type for every instantiation, 16-byte aligned.
struct alignas(16) OnchipSmem {
  uint32_t w[4];
};

// The unit's sum of v over the cluster, in every thread of it: the block sums (block_allsum), each
// block's in its `slot`, then the K slots in rank order (the same order in every block).
template <typename A>
__device__ __forceinline__ A cluster_allsum(A v, A* red, A* slot) {
  v = block_allsum(v, red);
  if (threadIdx.x == 0) *slot = v;
  simt::cluster_sync();
  A s = A(0);
  const int K = simt::cluster_blocks();
  for (int k = 0; k < K; ++k) s += *simt::cluster_map(slot, k);
  return s;
}

// f(act_c, has_z) with the activation and the residual as compile-time constants: the kernels'
// normalize loops are instantiated for ReLU and no activation with and without a residual (without
// only, for WithZ = false), and for SiLU and GELU without (GroupNorm has no residual;
// onchip_norm_fwd refuses the other combinations).
template <bool WithZ = true, typename F>
__device__ __forceinline__ void with_epilogue(Act act, bool has_z, F&& f) {
  using no_z = std::false_type;
  switch (act) {
    case Act::Relu:
      if (WithZ && has_z) {
        f(std::integral_constant<Act, Act::Relu>(), std::true_type());
      } else {
        f(std::integral_constant<Act, Act::Relu>(), no_z());
      }
      break;
    case Act::Silu: f(std::integral_constant<Act, Act::Silu>(), no_z()); break;
    case Act::Gelu: f(std::integral_constant<Act, Act::Gelu>(), no_z()); break;
    default:
      if (WithZ && has_z) {
        f(std::integral_constant<Act, Act::None>(), std::true_type());
      } else {
        f(std::integral_constant<Act, Act::None>(), no_z());
      }
  }
}

// y = act((x - mean) * rstd * w[c] + b[c] (+ z)); mean_out / var_out per unit (var_out: the
// biased variance, or rstd with rstd_out). Grid: units * K blocks in clusters of K.
template <typename T, typename W, int V>
__global__ void __launch_bounds__(kOnchipMaxThreads)
    onchip_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y,
                           const W* __restrict__ w, const W* __restrict__ b, OnchipUnits u, acc_t<T> eps, Act act,
                           bool rstd_out, acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ var_out) {
  using A = acc_t<T>;
  using VT = Vec<T, V>;
  FUSENORM_DYNAMIC_SMEM(OnchipSmem, onchip_smem);
  VT* buf = reinterpret_cast<VT*>(onchip_smem);         // [per_block] vectors of the share
  A* coef = reinterpret_cast<A*>(buf + u.per_block);   // [2][cpg]: scale, shift of the unit's channels
  __shared__ A red[32];
  __shared__ A slot[2];  // this block's sums, read by the whole cluster
  const int K = simt::cluster_blocks(), k = simt::cluster_rank();
  const int64_t unit = blockIdx.x / K;
  const int total = static_cast<int>(u.runs * u.run_vecs);  // fits on chip, so in an int
  const int j0 = static_cast<int>(int64_t(total) * k / K), n = static_cast<int>(int64_t(total) * (k + 1) / K) - j0;
  const int run_vecs = static_cast<int>(u.run_vecs);
  const bool one_run = u.runs == 1;
  const int64_t base = unit * u.run_vecs;  // the unit's first vector
  struct Pos {
    int64_t i;  // index into x (and z, y), in vectors
    int l;      // offset in its run, in vectors
  };
  auto locate = [&](int j) {  // vector j of the unit
    const int r = one_run ? 0 : u.by_run(j), l = j - r * run_vecs;
    return Pos{base + int64_t(r) * u.run_stride + l, l};
  };
  const A pivot = pivot_of(static_cast<A>(x[base * V]));

  // 1. load the share (four vectors in flight per thread), sum x - pivot
  A s = A(0);
  for (int j = threadIdx.x; j < n; j += 4 * blockDim.x) {
    VT v[4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (j + t * int(blockDim.x) < n) v[t] = load_vec<V>(x, locate(j0 + j + t * blockDim.x).i);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (j + t * int(blockDim.x) >= n) continue;
      buf[j + t * blockDim.x] = v[t];
#pragma unroll
      for (int e = 0; e < V; ++e) s += static_cast<A>(v[t].v[e]) - pivot;
    }
  }
  const A count = static_cast<A>(int64_t(total) * V);
  const A shift = cluster_allsum(s, red, &slot[0]) / count;  // mean - pivot

  // 2. squared deviations, from the share this thread wrote
  A q = A(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const VT v = buf[j];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A d = (static_cast<A>(v.v[e]) - pivot) - shift;
      q += d * d;
    }
  }
  const A var = cluster_allsum(q, red, &slot[1]) / count;
  const A rstd = simt::rsqrt(var + eps);
  if (k == 0 && threadIdx.x == 0) {
    mean_out[unit] = pivot + shift;
    var_out[unit] = rstd_out ? rstd : var;
  }
  const int cpg = static_cast<int>(u.cpg);
  const int64_t c0 = (unit % u.groups) * u.cpg;
  for (int c = threadIdx.x; c < cpg; c += blockDim.x) {
    coef[c] = w ? rstd * static_cast<A>(w[c0 + c]) : rstd;
    coef[cpg + c] = b ? static_cast<A>(b[c0 + c]) : A(0);
  }
  __syncthreads();

  // 3. normalize the share, write y; the activation and the residual are compile-time in the loop
  const bool one_chan = cpg == 1;
  auto normalize = [&](auto act_c, auto has_z) {
    constexpr Act ACT = decltype(act_c)::value;
    constexpr bool Z = decltype(has_z)::value;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const Pos p = locate(j0 + j);
      const int64_t i = p.i;
      const int ch = one_chan ? 0 : u.by_chan(p.l);
      const VT v = buf[j];
      VT zv{}, out;
      if constexpr (Z) zv = load_vec<V>(z, i);
      const A sc = coef[ch], sh = coef[cpg + ch];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A t = ((static_cast<A>(v.v[e]) - pivot) - shift) * sc + sh;
        if constexpr (Z) t += static_cast<A>(zv.v[e]);
        out.v[e] = static_cast<T>(activate(ACT, t));
      }
      store_vec<V>(y, i, out);
    }
  };
  with_epilogue(act, z != nullptr, normalize);
  simt::cluster_sync();  // no block leaves while another may still read its slots
}

// Channels-last units: L consecutive channels (whole groups of cpg channels, `slots` = L / cpg
// statistics) at the R sites of one sample, site r's L values at r * C: a unit per (n, chunk of
// groups). (With one sample of R = N * S sites and cpg = 1 the units would be BatchNorm's chunks of
// channels; BatchNorm does not use it, see batch_norm.cuh.)
struct OnchipNscUnits {
  int64_t units;      // samples * chunks
  int64_t chunks;     // C / L
  int64_t sites;      // R
  int64_t row_vecs;   // L / V: P
  int64_t site_vecs;  // C / V
  int64_t cpg;        // channels per statistic
  int64_t per_block;  // capacity of a block's share, in sites
};

// The same three steps as onchip_norm_fwd_kernel for a channels-last unit. Thread t keeps to column
// t % P of the unit's rows (blockDim is a multiple of P), so the V lanes of each thread hold fixed
// channels, and fixed statistics: sums per lane, then a warp per statistic over its channels of the
// block's rows, then per unit over the cluster's blocks in rank order. Each statistic's pivot is the
// unit's first value of its first channel. Deterministic: fixed orders, no atomics.
template <typename T, typename W, int V>
__global__ void __launch_bounds__(kOnchipMaxThreads, 2)
    onchip_nsc_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ w,
                          const W* __restrict__ b, OnchipNscUnits u, acc_t<T> eps, Act act, bool rstd_out,
                          acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ var_out) {
  using A = acc_t<T>;
  using VT = Vec<T, V>;
  FUSENORM_DYNAMIC_SMEM(OnchipSmem, onchip_smem);
  const int P = static_cast<int>(u.row_vecs), L = P * V, rows = static_cast<int>(blockDim.x) / P;
  const int cpg = static_cast<int>(u.cpg), slots = L / cpg;
  VT* buf = reinterpret_cast<VT*>(onchip_smem);  // [per_block][P] the share's rows
  // [blockDim][V] each thread's lane sums, 16-byte aligned after the share
  A* part = reinterpret_cast<A*>(onchip_smem + (u.per_block * P * int64_t(sizeof(VT)) + 15) / 16);
  A* slot = part + blockDim.x * V;  // [2][slots] this block's sums, read by the cluster
  A* stat = slot + 2 * slots;       // [2][slots] the unit's mean - pivot, rstd
  const int K = simt::cluster_blocks(), k = simt::cluster_rank();
  const int64_t unit = blockIdx.x / K, sample = unit / u.chunks, chunk = unit % u.chunks;
  const int R = static_cast<int>(u.sites);  // fits on chip, so in an int
  const int r0 = static_cast<int>(int64_t(R) * k / K), n = static_cast<int>(int64_t(R) * (k + 1) / K) - r0;
  const int col = static_cast<int>(threadIdx.x) % P, row = static_cast<int>(threadIdx.x) / P;
  const int64_t base = sample * R * u.site_vecs + chunk * P;  // the unit's first vector
  auto at = [&](int r) { return base + int64_t(r0 + r) * u.site_vecs + col; };
  A piv[V];
#pragma unroll
  for (int e = 0; e < V; ++e) piv[e] = pivot_of(static_cast<A>(x[base * V + (col * V + e) / cpg * cpg]));

  // The unit's sums of the lanes' v per slot, into out[slots] (every thread reads them after): a
  // full warp per slot adds its cpg channels of the block's rows (part[rr][c] is row rr's channel
  // c), lane-strided then across the warp.
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int full_warps = static_cast<int>(blockDim.x) / 32;  // blockDim >= 64 (the host's choice)
  auto unit_sums = [&](const A(&v)[V], A* mine, A* out) {
#pragma unroll
    for (int e = 0; e < V; ++e) part[threadIdx.x * V + e] = v[e];
    __syncthreads();
    if (warp < full_warps) {
      for (int g = warp; g < slots; g += full_warps) {
        A s = A(0);
        for (int i = lane; i < cpg * rows; i += 32) s += part[(i / cpg) * L + g * cpg + i % cpg];
        s = warp_allsum(s);
        if (lane == 0) mine[g] = s;
      }
    }
    simt::cluster_sync();
    for (int g = threadIdx.x; g < slots; g += blockDim.x) {
      A s = A(0);
      for (int kk = 0; kk < K; ++kk) s += simt::cluster_map(mine, kk)[g];
      out[g] = s;
    }
    __syncthreads();
  };

  // 1. load the share (four rows in flight per thread), sum x - pivot
  A acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = A(0);
  for (int r = row; r < n; r += 4 * rows) {
    VT v[4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (r + t * rows < n) v[t] = load_vec<V>(x, at(r + t * rows));
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (r + t * rows >= n) continue;
      buf[(r + t * rows) * P + col] = v[t];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += static_cast<A>(v[t].v[e]) - piv[e];
    }
  }
  const A count = static_cast<A>(int64_t(R) * cpg);
  unit_sums(acc, slot, stat);
  A shift[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    shift[e] = stat[(col * V + e) / cpg] / count;  // mean - pivot
    acc[e] = A(0);
  }

  // 2. squared deviations, from the rows this thread wrote
  for (int r = row; r < n; r += rows) {
    const VT v = buf[r * P + col];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A d = (static_cast<A>(v.v[e]) - piv[e]) - shift[e];
      acc[e] += d * d;
    }
  }
  unit_sums(acc, slot + slots, stat + slots);
  for (int g = threadIdx.x; g < slots; g += blockDim.x) {
    const A var = stat[slots + g] / count, rstd = simt::rsqrt(var + eps);
    if (k == 0) {
      const int64_t o = (sample * u.chunks + chunk) * slots + g;  // n * G + the group
      mean_out[o] = pivot_of(static_cast<A>(x[base * V + g * cpg])) + stat[g] / count;
      var_out[o] = rstd_out ? rstd : var;
    }
    stat[slots + g] = rstd;  // each thread replaces the sum it alone read
  }
  __syncthreads();
  A sc[V], sh[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t ch = chunk * L + col * V + e;
    const A rstd = stat[slots + (col * V + e) / cpg];
    sc[e] = w ? rstd * static_cast<A>(w[ch]) : rstd;
    sh[e] = b ? static_cast<A>(b[ch]) : A(0);
  }

  // 3. normalize the share, write y
  auto normalize = [&](auto act_c, auto) {
    constexpr Act ACT = decltype(act_c)::value;
    for (int r = row; r < n; r += rows) {
      const VT v = buf[r * P + col];
      VT out;
#pragma unroll
      for (int e = 0; e < V; ++e)
        out.v[e] = static_cast<T>(activate(ACT, ((static_cast<A>(v.v[e]) - piv[e]) - shift[e]) * sc[e] + sh[e]));
      store_vec<V>(y, at(r), out);
    }
  };
  with_epilogue<false>(act, false, normalize);
  simt::cluster_sync();  // no block leaves while another may still read its slots
}

// The shared memory a block may use for its share: FUSENORM_ONCHIP_BYTES, else 100 KiB (two blocks
// per H100 multiprocessor; the kernels' smaller arrays beside the share are not counted, so a
// channels-last share near the budget with its lane sums, up to 16 KiB, leaves room for one). In
// scripts/onchip_sweep.py on an H100 (benchmarks/results/) it was the best budget or within 3
// points of copy speed of it for every fp32 case, and 9-12 points ahead of 72 KiB for the large bf16
// BatchNorm/GroupNorm units (fewer blocks per unit). 0: the path is off.
inline int64_t onchip_budget() {
  const char* e = std::getenv("FUSENORM_ONCHIP_BYTES");
  return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(100) * 1024;
}

struct OnchipPlan {
  int cluster = 0;  // 0: the tensor does not fit, run the two-pass kernels
  int threads = 0;
  size_t smem = 0;
  int64_t per_block = 0;  // items of the unit a block holds
};

// What a device allows a kernel, found once per (device, kernel): clusters above one block only
// where the kernel runs code compiled for sm_90 (its PTX version: a build whose newest target is
// older runs that code through the driver's JIT, where cluster_blocks() is 1); the dynamic shared
// memory beside its static arrays, opted in once to the maximum (a per-launch setting could be
// lowered by another thread between its set and its launch).
struct OnchipDevice {
  int max_cluster = 1;
  size_t max_smem = 0;
};

// The launch of units of `items` items of `item_bytes` each (a block's share holds whole items, a
// multiple of `align` of them): clusters as small as the budget allows (at most the device's
// largest), doubled while the grid has fewer than two blocks per multiprocessor and a share of
// items / 2K items keeps at least min_share bytes; `threads(per_block)` threads and
// `smem(per_block, threads)` bytes per block. A launch the device cannot hold is refused.
template <typename... P, typename Threads, typename Smem>
OnchipPlan onchip_plan(void (*kernel)(P...), int dev, int64_t units, int64_t items, int64_t item_bytes,
                       int64_t align, int64_t min_share, Threads&& threads_for, Smem&& smem_for) {
  OnchipPlan p;
  const int64_t budget = onchip_budget();
  if (budget == 0 || items == 0 || units == 0) return p;
  static std::mutex mu;
  static std::map<std::pair<int, void*>, OnchipDevice> devices;
  // whether the device can hold one cluster of (K, threads, smem rounded up to 8 KiB)
  static std::map<std::tuple<int, void*, int, int, size_t>, bool> fits;
  std::lock_guard<std::mutex> lock(mu);
  const simt::DeviceLimits lim = simt::device_limits(dev);  // its cache is not thread-safe by itself
  void* const kid = reinterpret_cast<void*>(kernel);
  auto d = devices.find({dev, kid});
  if (d == devices.end()) {
    const simt::KernelInfo info = simt::kernel_info(kernel);
    OnchipDevice od;
    od.max_cluster = info.ptx_version >= 90 ? lim.max_cluster : 1;
    od.max_smem = size_t(lim.smem_optin) > info.static_smem ? size_t(lim.smem_optin) - info.static_smem : 0;
    simt::allow_dynamic_smem(kernel, od.max_smem);
    d = devices.emplace(std::make_pair(dev, kid), od).first;
  }
  const OnchipDevice od = d->second;
  auto share = [&](int K) { return ceil_div(ceil_div(items, K), align) * align; };
  int K = 1;
  while (share(K) * item_bytes > budget && K < od.max_cluster) K *= 2;
  if (share(K) * item_bytes > budget) return p;
  while (units * K < 2 * int64_t(lim.sms) && K < std::min(8, od.max_cluster) &&
         ceil_div(items, 2 * K) * item_bytes >= min_share)
    K *= 2;
  if (units * K > int64_t(0x7fffffff)) return p;
  const int64_t per_block = share(K);
  const int threads = threads_for(per_block);
  const size_t smem = smem_for(per_block, threads);
  if (smem > od.max_smem) return p;
  const size_t smem_class = std::min(od.max_smem, (smem + 8191) / 8192 * 8192);  // >= smem: a safe answer
  const auto key = std::make_tuple(dev, kid, K, threads, smem_class);
  auto it = fits.find(key);
  if (it == fits.end()) it = fits.emplace(key, simt::max_active_clusters(kernel, K, threads, smem_class) > 0).first;
  if (!it->second) return p;
  p.cluster = K;
  p.threads = threads;
  p.smem = smem;
  p.per_block = per_block;
  return p;
}

// 128 to kOnchipMaxThreads threads, about 8 vectors of the share each.
inline int onchip_threads(int64_t vecs) {
  int threads = 128;
  while (threads < kOnchipMaxThreads && threads * 8 < vecs) threads *= 2;
  return threads;
}

// The widest vector of V values (16 bytes, 8 bytes for 2-byte types, one value) that divides S and
// that the pointers' alignment allows; run(integral_constant<int, V>) launches with it.
template <typename T, typename Run>
bool with_vec_width(int64_t S, const T* x, const T* z, const T* y, Run&& run) {
  constexpr int VW = vec_width<T>();
  if (S % VW == 0 && is_aligned(x, 16) && is_aligned(z, 16) && is_aligned(y, 16))
    return run(std::integral_constant<int, VW>());
  if constexpr (VW == 8) {
    if (S % 4 == 0 && is_aligned(x, 8) && is_aligned(z, 8) && is_aligned(y, 8))
      return run(std::integral_constant<int, 4>());
  }
  return run(std::integral_constant<int, 1>());
}

// Runs the single-pass forward of a contiguous tensor when it fits (returns true), else leaves it
// to the caller. make_units(V) describes the units in vectors of V values (every run starts at a
// multiple of S).
template <typename T, typename W, typename MakeUnits>
bool onchip_norm_fwd(MakeUnits&& make_units, int64_t S, int dev, const T* x, const T* z, T* y, const W* w,
                     const W* b, acc_t<T> eps, Act act, bool rstd_out, acc_t<T>* mean_out, acc_t<T>* var_out) {
  using A = acc_t<T>;
  if (z && act != Act::None && act != Act::Relu) return false;  // not one of the kernel's loop variants
  return with_vec_width(S, x, z, y, [&](auto vw) {
    constexpr int V = decltype(vw)::value;
    OnchipUnits u = make_units(int64_t(V));
    if (u.cpg > 4096) return false;
    auto kernel = onchip_norm_fwd_kernel<T, W, V>;
    const OnchipPlan p = onchip_plan(
        kernel, dev, u.units, u.runs * u.run_vecs, int64_t(sizeof(Vec<T, V>)), 8,  // 8: keeps coef aligned
        2048 * int64_t(sizeof(Vec<T, V>)),  // shares of at least 2048 vectors
        [](int64_t per_block) { return onchip_threads(per_block); },
        [&](int64_t per_block, int) { return size_t(per_block) * sizeof(Vec<T, V>) + size_t(2 * u.cpg) * sizeof(A); });
    if (p.cluster == 0) return false;
    u.by_run = FastDiv(u.run_vecs);
    u.by_chan = FastDiv(u.chan_vecs);
    u.per_block = p.per_block;
    simt::launch_cluster(kernel, dim3(static_cast<unsigned>(u.units * p.cluster)), dim3(p.threads), p.smem,
                         simt::current_stream(), p.cluster, x, z, y, w, b, u, eps, act, rstd_out, mean_out, var_out);
    return true;
  });
}

// The channels of a channels-last unit: the fewest whole groups (of cpg channels, out of C) whose
// row is a multiple of 32 bytes (a DRAM sector) and at least min_row bytes, else a multiple of 16
// bytes, else all C channels.
inline int64_t onchip_nsc_chunk(int64_t C, int64_t cpg, int64_t elem_bytes, int64_t min_row) {
  const int64_t G = C / cpg;
  for (int64_t need : {int64_t(32), int64_t(16)})
    for (int64_t gb = 1; gb <= G; ++gb) {
      const int64_t row = gb * cpg * elem_bytes;
      if (G % gb == 0 && row % need == 0 && (need == 16 || row >= min_row)) return gb * cpg;
    }
  return C;
}

// A block's share of a channels-last unit is not split below 64 KiB to fill the device: on an H100
// (benchmarks/results/, onchip_sweep) GroupNorm 8x640x32x32 in shares of 40 KiB ran at 44 % of copy
// (fp32) where the two-pass kernels ran at 48 %, and shares of 80 KiB beat them (16x320x64x64:
// 64 % against 55 %; 16x1280x32x32: 61 % against 54 %).
constexpr int64_t kOnchipNscMinShare = 64 * 1024;

// The single-pass forward of a channels-last tensor [samples, sites, C] when it fits (returns true),
// in rows of L channels (onchip_nsc_chunk: at least 64 bytes where whole groups allow): statistics
// over (sample, group of cpg channels), C / cpg of them per sample (GroupNorm).
template <typename T, typename W>
bool onchip_nsc_fwd(int64_t samples, int64_t sites, int64_t C, int64_t cpg, int dev, const T* x, T* y, const W* w,
                    const W* b, acc_t<T> eps, Act act, bool rstd_out, acc_t<T>* mean_out, acc_t<T>* var_out) {
  using A = acc_t<T>;
  if (sites > int64_t(0x7fffffff) / 2) return false;
  const int64_t L = onchip_nsc_chunk(C, cpg, int64_t(sizeof(T)), 64);
  return with_vec_width(L, x, static_cast<const T*>(nullptr), y, [&](auto vw) {
    constexpr int V = decltype(vw)::value;
    const int64_t P = L / V;
    if (P > kOnchipMaxThreads) return false;
    OnchipNscUnits u{samples * (C / L), C / L, sites, P, C / V, cpg, 0};
    auto kernel = onchip_nsc_fwd_kernel<T, W, V>;
    const OnchipPlan p = onchip_plan(
        kernel, dev, u.units, sites, P * int64_t(sizeof(Vec<T, V>)), 1, kOnchipNscMinShare,
        [&](int64_t per_block) {
          return static_cast<int>(std::max<int64_t>(1, onchip_threads(per_block * P) / P) * P);
        },
        [&](int64_t per_block, int threads) {
          return (size_t(per_block * P) * sizeof(Vec<T, V>) + 15) / 16 * 16 +
                 size_t(threads * V + 4 * (L / cpg)) * sizeof(A);
        });
    if (p.cluster == 0) return false;
    u.per_block = p.per_block;
    simt::launch_cluster(kernel, dim3(static_cast<unsigned>(u.units * p.cluster)), dim3(p.threads), p.smem,
                         simt::current_stream(), p.cluster, x, y, w, b, u, eps, act, rstd_out, mean_out, var_out);
    return true;
  });
}

}  // namespace fusenorm::cuda

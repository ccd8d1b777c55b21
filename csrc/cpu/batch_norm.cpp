// fusenorm::batch_norm_* on CPU, both layouts (see common/batch_norm_ops.h).
//
// Statistics, exact and independent of the thread count:
//   NCS: each (n, c) run of S values gets exact two-pass moments from cache (chunks of <= 16K
//        values), merged over n per channel with Chan's formula in order; the fused training
//        forward (below) instead makes two passes over a channel held in L2.
//   NSC: the N * S rows are cut into chunks of ~16K values and at least 64 rows (with 16 rows per
//        chunk at C = 1024, a bf16 pass spent much of its time merging each chunk's C partials: 64
//        took BatchNorm2d channels-last 64x1024x14x14 bf16 from 2.4-3.1 to 1.5-2.3 ms); each chunk
//        gets exact two-pass per-channel moments relative to a pivot (the first row), a block of
//        channels at a time from L1; a fixed set of tasks merges its chunks in order (Chan), then
//        the tasks are merged in order, in parallel over channels.
// Training forward and backward in NCS fuse both passes per channel when a channel fits in L2 (see
// fuse_channels). Elementwise passes (apply, dx) run along the contiguous axis over whole spans of
// runs (NCS, per-run coefficients: runs_for) or of rows (NSC, per-channel coefficient arrays:
// rows_for), SIMD (cpu/vec.h) for fp32 accumulation. y = act((x - mean) * (rstd * w) + b + z):
// subtracting the mean first keeps large-mean inputs exact, where x * scale + (b - mean * scale)
// would cancel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/batch_norm_ops.h"
#include "cpu/row_norm.h"

namespace fusenorm::cpu {

constexpr int64_t kBnChunk = 16384;  // values per cache-resident chunk
constexpr int64_t kBnTasks = 64;     // NSC: chunk ranges merged independently (not the thread count)
constexpr int64_t kBnSumRows = 64;   // NSC backward: rows summed apart before they join their task's sums
constexpr int64_t kBnFuseBytes = int64_t(1) << 19;  // one channel's data kept in L2 between passes

// The pivot of channel c of an NCS input with S sites per run (its first value, pivot_of): every
// pass that sums x - pivot and every mean that adds it back take it from here.
template <typename A, typename T>
inline A ncs_pivot(const T* x, int64_t c, int64_t S) {
  return pivot_of(static_cast<A>(x[c * S]));
}

// Exact moments of n <= kBnChunk contiguous values relative to the channel's pivot c (its first
// value): one read into cache, two passes from there (straight from p where reads_direct<T>;
// otherwise through a converted copy in buf). The mean stays relative to c until every run is
// merged: absolute means near a large offset would be rounded to its ulp at every merge.
template <typename T, typename A>
Welford<A> run_moments(const T* p, int64_t n, A* buf, A c) {
  constexpr bool same = std::is_same_v<T, A>;
  const A* v = same ? reinterpret_cast<const A*>(p) : buf;
  Welford<A> w;
  w.count = A(n);
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    w.mean = sum_dev_vec(p, n, c) / A(n);
    w.m2 = sq_dev_vec(p, n, c, w.mean, static_cast<const T*>(nullptr));
    return w;
  }
#endif
  if constexpr (!same) to_acc(p, buf, n);
  w.mean = sum_of(v, n, c) / A(n);
  w.m2 = sq_dev_of(v, n, c, w.mean);
  return w;
}

// A channel's partial sums over its runs in the fused statistics: 32 lanes (lane j: values j mod
// 32 of each run), 8 lanes for the values after a run's groups of 32, 8 at a time (a 7x7 run:
// 32 + 16 + 1), and a scalar for the rest; lanes_add_runs adds runs to them, so a channel has no
// reduction or merge per run. As the row reductions (kSumBlock, row_norm.h), the sums are added to
// `flushed` (the same kLanes + kTailLanes + 1 sums) and restart about every kSumBlock values (see
// run_ends_block): 64x16x32x32 ReLU-like data lost 4e-5 of fp32 output with one set of lanes for
// a whole channel (torch.nn 6e-7). The 32 lanes are kept as the registers hold them (a
// bfloat16 Vec2: its even and odd halves, not permuted per call); total() puts them in order
// first, so the sum is the same in AVX2 and AVX-512 builds.
template <typename A>
struct RunLanes {
  A* lanes;    // kLanes
  A* tail8;    // kTailLanes
  A* tail;     // 1
  A* flushed;  // kLanes, kTailLanes, 1

  template <typename T>
  A total() const {
    alignas(64) A all[kLanes], all8[kTailLanes];
#if defined(FUSENORM_CPU_AVX512)
    if constexpr (std::is_same_v<A, float> && LaneVec<T>::kWidth == 32) {
      (load_held<LaneVec<T>>(flushed) + load_held<LaneVec<T>>(lanes)).lanes(all);
    } else
#endif
    {
      for (int j = 0; j < kLanes; ++j) all[j] = flushed[j] + lanes[j];
    }
    for (int j = 0; j < kTailLanes; ++j) all8[j] = flushed[kLanes + j] + tail8[j];
    return sum_lanes(all) + sum_lanes<kTailLanes>(all8) + (flushed[kLanes + kTailLanes] + *tail);
  }
};

// Where lanes_add_runs flushes: after run r (of n values, counted from the channel's first run)
// when it crosses a multiple of kSumBlock values, and within a run longer than kSumBlock after each
// kSumBlock of its values (i: the group of kLanes values just added), the last one left to the run's end.
inline bool run_ends_block(int64_t r, int64_t n) { return (r + 1) * n / kSumBlock > r * n / kSumBlock; }
inline bool in_run_block_end(int64_t i, int64_t n) { return (i + kLanes) % kSumBlock == 0 && i + kLanes < n; }

// Adds `runs` runs of n values, `stride` values apart, to a channel's RunLanes: the sums of v - c,
// or with SQ of ((v - c) - m)^2; r0 is the first run's index among the channel's runs. The lanes
// stay in registers over the runs (a fused block's second pass takes a channel's N runs in one
// call; its first pass reads the block sample by sample, one run per call). (The plain path: 32
// lanes, then the scalar.)
template <bool SQ, typename T, typename A>
inline void lanes_add_runs(const T* p, int64_t n, int64_t stride, int64_t r0, int64_t runs, A c, A m,
                           const RunLanes<A>& acc) {
  A* f = acc.flushed;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    using V = LaneVec<T>;
    using U = Vec<8>;
    constexpr int K = kLanes / V::kWidth;
    const V cv = V::set1(c), mv = V::set1(m);
    const U cu = U::set1(c), mu = U::set1(m);
    V t[K];
    for (int k = 0; k < K; ++k) t[k] = load_held<V>(acc.lanes + V::kWidth * k);  // no permutation
    U t8 = U::load(acc.tail8);
    float tail = *acc.tail;
    const auto flush = [&] {
      for (int k = 0; k < K; ++k) {
        store_held(load_held<V>(f + V::kWidth * k) + t[k], f + V::kWidth * k);
        t[k] = V::zero();
      }
      (U::load(f + kLanes) + t8).store(f + kLanes);
      t8 = U::zero();
      f[kLanes + kTailLanes] += tail;
      tail = 0.f;
    };
    for (int64_t r = 0; r < runs; ++r) {
      const T* q = p + r * stride;
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        for (int k = 0; k < K; ++k) {
          const V d = V::load(q + i + V::kWidth * k) - cv;
          if constexpr (SQ) {
            t[k] = fmadd(d - mv, d - mv, t[k]);
          } else {
            t[k] = t[k] + d;
          }
        }
        if (in_run_block_end(i, n)) flush();
      }
      for (; i + kTailLanes <= n; i += kTailLanes) {
        const U d = U::load(q + i) - cu;
        if constexpr (SQ) {
          t8 = fmadd(d - mu, d - mu, t8);
        } else {
          t8 = t8 + d;
        }
      }
      for (; i < n; ++i) {
        const float d = static_cast<float>(q[i]) - c;
        tail += SQ ? (d - m) * (d - m) : d;
      }
      if (run_ends_block(r0 + r, n)) flush();
    }
    for (int k = 0; k < K; ++k) store_held(t[k], acc.lanes + V::kWidth * k);
    t8.store(acc.tail8);
    *acc.tail = tail;
    return;
  }
#endif
  const auto flush = [&] {
    for (int j = 0; j < kLanes; ++j) {
      f[j] += acc.lanes[j];
      acc.lanes[j] = A(0);
    }
    f[kLanes + kTailLanes] += *acc.tail;
    *acc.tail = A(0);
  };
  for (int64_t r = 0; r < runs; ++r) {
    const T* q = p + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const A d = static_cast<A>(q[i + j]) - c;
        acc.lanes[j] += SQ ? (d - m) * (d - m) : d;
      }
      if (in_run_block_end(i, n)) flush();
    }
    for (; i < n; ++i) {
      const A d = static_cast<A>(q[i]) - c;
      *acc.tail += SQ ? (d - m) * (d - m) : d;
    }
    if (run_ends_block(r0 + r, n)) flush();
  }
}

// Prefetches the first 4 KiB of a run: in the per-channel (NCS) loops consecutive runs are C * S
// values apart, a jump the hardware prefetcher does not follow, and short runs (7x7, 14x14) would
// otherwise start each with a full memory latency. The fused passes prefetch each run of the next
// sample as they start the same run of this one, which spreads the prefetches over the span: the
// first 4 KiB of the next sample's whole span, prefetched at once, left the rest of it to memory
// latency (64x1024x14x14 bf16 training forward 2.5-2.8 -> 1.8-2.4 ms, backward 3.3-4.2 -> 2.9-3.2
// ms; 64x2048x7x7 fp32 forward 2.7-3.0 -> 2.3-2.6 ms).
template <typename T>
inline void prefetch_run(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = std::min<int64_t>(n * int64_t(sizeof(T)), 4096);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// The fixed task split of `chunks` chunks: task t covers [first(t), first(t + 1)).
inline int64_t task_first(int64_t t, int64_t chunks, int64_t tasks) { return chunks * t / tasks; }

// Channel c's coefficients, defined once so that the fused and the two-step paths compute the
// same values. Forward: y = (x - mean) * scale + shift with scale = rstd * w. Backward (grad_run):
// a = rstd * w, kg = k * k_g, e = a * rstd * k * k_gx (kg = e = 0 without k_g: eval).
template <typename A, typename W>
inline A fwd_scale(const A* var, const W* w, A eps, int64_t c) {
  return A(1) / std::sqrt(var[c] + eps) * (w ? static_cast<A>(w[c]) : A(1));
}

template <typename A>
struct GradCoef {
  A a, kg, e;
};

template <typename A, typename W>
inline GradCoef<A> grad_coef(const A* var, const W* w, A eps, int64_t c, const A* k_g, const A* k_gx, A k) {
  const A rs = A(1) / std::sqrt(var[c] + eps), a = rs * (w ? static_cast<A>(w[c]) : A(1));
  if (!k_g) return {a, A(0), A(0)};
  return {a, k_g[c] * k, a * rs * k_gx[c] * k};
}

// grad_run's coefficients for all C channels, as arrays (the NSC rows index them by channel),
// padded for rows_for.
template <typename A>
struct GradCoefs {
  Buf<A> mu, a, kg, e;
  template <typename W>
  GradCoefs(int64_t C, const A* mean, const A* var, const W* w, A eps, const A* k_g, const A* k_gx, A k)
      : mu(C + kRowsPad), a(C + kRowsPad), kg(C + kRowsPad), e(C + kRowsPad) {
    for (int64_t c = 0; c < C; ++c) {
      const GradCoef<A> g = grad_coef(var, w, eps, c, k_g, k_gx, k);
      mu[c] = mean[c];
      a[c] = g.a;
      kg[c] = g.kg;
      e[c] = g.e;
    }
    for (Buf<A>* v : {&mu, &a, &kg, &e}) pad_rows(v->data(), C);
  }
};

// Per-channel coefficients of the forward's elementwise pass, in the accumulation type, padded
// for rows_for.
template <typename A, typename W>
struct Coefs {
  Buf<A> mu, scale, shift;  // y = (x - mu) * scale + shift
  Coefs(int64_t C, const A* mean, const A* var, const W* w, const W* b, A eps)
      : mu(C + kRowsPad), scale(C + kRowsPad), shift(C + kRowsPad) {
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = mean[c];
      scale[c] = fwd_scale(var, w, eps, c);
      shift[c] = b ? static_cast<A>(b[c]) : A(0);
    }
    for (Buf<A>* v : {&mu, &scale, &shift}) pad_rows(v->data(), C);
  }
};

#ifdef FUSENORM_CPU_AVX2
// A vector of a coefficient: p[k, k + width) (PerLane, channels last) or *p broadcast.
template <bool PerLane, typename V>
inline V coef(const float* p, int64_t k) {
  return PerLane ? V::load(p + k) : V::set1(*p);
}
#endif

// act((x[i] - mu) * sc + sh + z[i]) for one value (the scalar tails of the passes below).
template <typename T, typename A>
inline T affine_one(const T* x, const T* z, int64_t i, A mu, A sc, A sh, bool relu) {
  A v = (static_cast<A>(x[i]) - mu) * sc + sh;
  if (z) v += static_cast<A>(z[i]);
  if (relu) v = v < A(0) ? A(0) : v;
  return static_cast<T>(v);
}

// out[i] = act((x[i] - mu) * sc + sh + z[i]) over a run of n values; mu/sc/sh are scalars (PerLane =
// false) or arrays indexed like x (PerLane = true, channels last).
template <bool PerLane, typename T, typename A>
inline void affine_run(const T* x, const T* z, T* y, int64_t n, const A* mu, const A* sc, const A* sh, bool relu,
                       bool nt) {
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>)
    i = simd_for<std::conditional_t<PerLane, float, T>>(n, [&](auto t, int64_t i) {
      using V = decltype(t);
      const int64_t k = PerLane ? i : 0;
      V v = fmadd(V::load(x + i) - coef<PerLane, V>(mu, k), coef<PerLane, V>(sc, k), coef<PerLane, V>(sh, k));
      if (z) v = v + V::load(z + i);
      if (relu) v = vmax(V::zero(), v);  // NaN (the second operand) stays NaN
      store_out(v, y + i, nt);
    });
#endif
  for (; i < n; ++i) {
    const int64_t k = PerLane ? i : 0;
    y[i] = affine_one(x, z, i, mu[k], sc[k], sh[k], relu);
  }
}

#ifdef FUSENORM_CPU_AVX2
// The vector step of affine_span and affine_rows (runs_for/rows_for): k = {mu, scale, shift}.
template <typename T>
inline auto affine_step(const T* x, const T* z, T* y, bool relu, bool nt) {
  return [=](auto t, int64_t i, const auto& k) {
    using V = decltype(t);
    V v = fmadd(V::load(x + i) - k[0], k[1], k[2]);
    if (z) v = v + V::load(z + i);
    if (relu) v = vmax(V::zero(), v);  // NaN (the second operand) stays NaN
    store_out(v, y + i, nt);
  };
}
#endif

// affine_run over a span of whole runs of S values, run r with channel (c + r) mod C: one pass with
// every vector store aligned (runs_for), where short runs do not fill whole vectors and lines.
template <typename T, typename A>
inline void affine_span(const T* x, const T* z, T* y, int64_t len, int64_t S, int64_t c, int64_t C, const A* mu,
                        const A* sc, const A* sh, bool relu, bool nt) {
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    runs_for(
        y, len, S, c, C, {mu, sc, sh},
        affine_step(x, z, y, relu, nt),
        [&](int64_t i, int64_t ch) { y[i] = affine_one(x, z, i, mu[ch], sc[ch], sh[ch], relu); });
    return;
  }
#endif
  for (int64_t o = 0; o < len; o += S, c = c + 1 == C ? 0 : c + 1)
    affine_run<false>(x + o, z ? z + o : nullptr, y + o, S, &mu[c], &sc[c], &sh[c], relu, nt);
}

// affine_run<true> over a span of whole rows of C values (channels last), with coefficient arrays
// padded as rows_for reads them: one pass whose streamed lines are whole at any C.
template <typename T, typename A>
inline void affine_rows(const T* x, const T* z, T* y, int64_t len, int64_t C, const A* mu, const A* sc, const A* sh,
                        bool relu, bool nt) {
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    rows_for(
        y, len, C, {mu, sc, sh},
        affine_step(x, z, y, relu, nt),
        [&](int64_t i, int64_t ch) { y[i] = affine_one(x, z, i, mu[ch], sc[ch], sh[ch], relu); });
    return;
  }
#endif
  for (int64_t o = 0; o < len; o += C) affine_run<true>(x + o, z ? z + o : nullptr, y + o, C, mu, sc, sh, relu, nt);
}

// g = dy, or 0 where the ReLU output y <= 0 (never dy * 0, so a non-finite dy gives 0; NaN y passes
// dy, as torch's threshold_backward).
template <typename T, typename A>
inline A grad_in(const T* dy, const T* y, int64_t i) {
  if (y && static_cast<A>(y[i]) <= A(0)) return A(0);
  return static_cast<A>(dy[i]);
}

// sg += sum g, sgx += sum g * (x - mu) over a run; scalars or per-channel arrays as above. The
// scalar sums alternate between two 8-wide accumulators, a summation order kept at every width.
template <bool PerLane, typename T, typename A>
inline void grad_sums_run(const T* dy, const T* x, const T* y, int64_t n, const A* mu, A* sg, A* sgx) {
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    using V = Vec<8>;
    V ag = V::zero(), agx = V::zero(), ag2 = V::zero(), agx2 = V::zero();  // named: kept in registers
    for (; i + 8 <= n; i += 8) {
      const int64_t k = PerLane ? i : 0;
      V g = V::load(dy + i);
      if (y) g = relu_pass(V::load(y + i), g);
      const V d = V::load(x + i) - coef<PerLane, V>(mu, k);
      if constexpr (PerLane) {
        (V::load(sg + k) + g).store(sg + k);
        fmadd(g, d, V::load(sgx + k)).store(sgx + k);
      } else if ((i / 8) % 2 == 0) {
        ag = ag + g;
        agx = fmadd(g, d, agx);
      } else {
        ag2 = ag2 + g;
        agx2 = fmadd(g, d, agx2);
      }
    }
    if constexpr (!PerLane) {
      alignas(32) float l1[8], l2[8];
      (ag + ag2).store(l1);
      (agx + agx2).store(l2);
      for (int j = 0; j < 8; ++j) {
        *sg += l1[j];
        *sgx += l2[j];
      }
    }
  }
#endif
  for (; i < n; ++i) {
    const int64_t k = PerLane ? i : 0;
    const A g = grad_in<T, A>(dy, y, i);
    sg[k] += g;
    sgx[k] += g * (static_cast<A>(x[i]) - mu[k]);
  }
}

// dx = a * (g - kg) - (x - mu) * e and dz = g for one value (the scalar tails below).
template <typename T, typename A>
inline void grad_one(const T* dy, const T* x, const T* y, T* dx, T* dz, int64_t i, A mu, A a, A kg, A e) {
  const A g = grad_in<T, A>(dy, y, i);
  if (dz) dz[i] = static_cast<T>(g);
  if (dx) dx[i] = static_cast<T>(x ? a * (g - kg) - (static_cast<A>(x[i]) - mu) * e : a * g);
}

// dx = a * (g - kg) - (x - mu) * e over a run; dz = g. Eval passes x = null: dx = a * g without
// reading x (a NaN or infinite x then leaves dx finite, as torch.nn's eval backward does).
template <bool PerLane, typename T, typename A>
inline void grad_run(const T* dy, const T* x, const T* y, T* dx, T* dz, int64_t n, const A* mu, const A* a,
                     const A* kg, const A* e, bool nt) {
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>)
    i = simd_for<std::conditional_t<PerLane, float, T>>(n, [&](auto t, int64_t i) {
      using V = decltype(t);
      const int64_t k = PerLane ? i : 0;
      V g = V::load(dy + i);
      if (y) g = relu_pass(V::load(y + i), g);
      if (dz) store_out(g, dz + i, nt);
      if (!dx) return;
      if (!x) return store_out(coef<PerLane, V>(a, k) * g, dx + i, nt);
      const V d = V::load(x + i) - coef<PerLane, V>(mu, k);
      store_out(fnmadd(d, coef<PerLane, V>(e, k), coef<PerLane, V>(a, k) * (g - coef<PerLane, V>(kg, k))), dx + i, nt);
    });
#endif
  for (; i < n; ++i) {
    const int64_t k = PerLane ? i : 0;
    grad_one(dy, x, y, dx, dz, i, mu[k], a[k], kg[k], e[k]);
  }
}

#ifdef FUSENORM_CPU_AVX2
// The vector step of grad_span and grad_rows: k = {mu, a, kg, e}, as grad_run.
template <typename T>
inline auto grad_step(const T* dy, const T* x, const T* y, T* dx, T* dz, bool nt) {
  return [=](auto t, int64_t i, const auto& k) {
    using V = decltype(t);
    V g = V::load(dy + i);
    if (y) g = relu_pass(V::load(y + i), g);
    if (dz) store_out(g, dz + i, nt);
    if (!dx) return;
    if (!x) return store_out(k[1] * g, dx + i, nt);
    const V d = V::load(x + i) - k[0];
    store_out(fnmadd(d, k[3], k[1] * (g - k[2])), dx + i, nt);
  };
}
#endif

// grad_run over a span of whole runs, as affine_span.
template <typename T, typename A>
inline void grad_span(const T* dy, const T* x, const T* y, T* dx, T* dz, int64_t len, int64_t S, int64_t c,
                      int64_t C, const A* mu, const A* a, const A* kg, const A* e, bool nt) {
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    runs_for(
        dx ? dx : dz, len, S, c, C, {mu, a, kg, e},
        grad_step(dy, x, y, dx, dz, nt),
        [&](int64_t i, int64_t ch) { grad_one(dy, x, y, dx, dz, i, mu[ch], a[ch], kg[ch], e[ch]); });
    return;
  }
#endif
  for (int64_t o = 0; o < len; o += S, c = c + 1 == C ? 0 : c + 1)
    grad_run<false>(dy + o, x ? x + o : nullptr, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr, S,
                    &mu[c], &a[c], &kg[c], &e[c], nt);
}

// grad_run<true> over a span of whole rows, as affine_rows.
template <typename T, typename A>
inline void grad_rows(const T* dy, const T* x, const T* y, T* dx, T* dz, int64_t len, int64_t C, const A* mu,
                      const A* a, const A* kg, const A* e, bool nt) {
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    rows_for(
        dx ? dx : dz, len, C, {mu, a, kg, e},
        grad_step(dy, x, y, dx, dz, nt),
        [&](int64_t i, int64_t ch) { grad_one(dy, x, y, dx, dz, i, mu[ch], a[ch], kg[ch], e[ch]); });
    return;
  }
#endif
  for (int64_t o = 0; o < len; o += C)
    grad_run<true>(dy + o, x ? x + o : nullptr, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr, C,
                   mu, a, kg, e, nt);
}

struct BatchNormBackend {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  // NCS, training: when one channel's N runs stay in L2 between its passes and there are enough
  // channels for every thread, each thread takes its channels in blocks that fit in L2 and reads a
  // block's runs sample by sample (one contiguous span each: short runs, 14x14 or 7x7, would
  // otherwise be read a few hundred bytes at a time, C * S values apart). Forward: the sums of
  // x - pivot, then of squared deviations (32 lanes per channel carried across its runs), then y,
  // the last two passes from cache. Backward: the sums, then dx from cache. x (and dy) come from
  // memory once.
  static bool fuse_channels(const BatchNormShape& s, int64_t bytes_per_site) {
    return !s.channels_last && s.C >= at::get_num_threads() && s.count() * bytes_per_site <= kBnFuseBytes;
  }

  // Channels per block: as many as fit in kBnFuseBytes, at most a thread's share.
  static int64_t channel_block(const BatchNormShape& s, int64_t bytes_per_site) {
    const int64_t fit = std::max<int64_t>(1, kBnFuseBytes / (s.count() * bytes_per_site));
    const int64_t share = (s.C + at::get_num_threads() - 1) / at::get_num_threads();
    return std::max<int64_t>(1, std::min(fit, share));
  }

  template <typename T, typename W>
  static void fwd_train(const BatchNormShape& s, const at::Tensor& xc, const T* x, const W* w, const W* b, const T* z,
                        acc_t<T> eps, Act act, T* y, acc_t<T>* mean, acc_t<T>* var) {
    using A = acc_t<T>;
    if (!fuse_channels(s, sizeof(T)))
      return compose_fwd_train<BatchNormBackend, T, W>(s, xc, x, w, b, z, eps, act, y, mean, var);
    const int64_t C = s.C, S = s.S, cb_max = channel_block(s, sizeof(T));
    const bool nt = stream_output(s.numel() * int64_t(sizeof(T)));
    at::parallel_for(0, C, work_grain(s.count()), [&](int64_t cb, int64_t ce) {
      // per channel of the block (RunLanes): the sums of d = x - pivot, then of (d - mean)^2
      constexpr int64_t kFlushed = kLanes + kTailLanes + 1;
      Buf<A> lanes(cb_max * kLanes), tails8(cb_max * kTailLanes), tails(cb_max), flushed(cb_max * kFlushed),
          mrel(cb_max), scale(cb_max), shift(cb_max);
      for (int64_t c0 = cb; c0 < ce; c0 += cb_max) {
        const int64_t c1 = std::min(ce, c0 + cb_max);
        for (int pass = 0; pass < 2; ++pass) {
          std::fill(lanes.begin(), lanes.end(), A(0));
          std::fill(tails8.begin(), tails8.end(), A(0));
          std::fill(tails.begin(), tails.end(), A(0));
          std::fill(flushed.begin(), flushed.end(), A(0));
          const auto channel = [&](int64_t c) {  // the block's channel c: its partial sums
            const int64_t j = c - c0;
            return RunLanes<A>{lanes.data() + j * kLanes, tails8.data() + j * kTailLanes, tails.data() + j,
                               flushed.data() + j * kFlushed};
          };
          if (pass == 0) {
            for (int64_t n = 0; n < s.N; ++n) {
              const T* p = x + (n * C + c0) * S;  // the block's runs of sample n: one contiguous span
              for (int64_t c = c0; c < c1; ++c, p += S) {
                if (n + 1 < s.N) prefetch_run(p + C * S, S);  // this run of the next sample
                lanes_add_runs<false>(p, S, C * S, n, 1, ncs_pivot<A>(x, c, S), A(0), channel(c));
              }
            }
          } else {  // from cache: channel by channel, its lanes in registers over its N runs
            for (int64_t c = c0; c < c1; ++c)
              lanes_add_runs<true>(x + c * S, S, C * S, 0, s.N, ncs_pivot<A>(x, c, S), mrel[c - c0], channel(c));
          }
          const A count = static_cast<A>(s.count());
          for (int64_t c = c0; c < c1; ++c) {
            const A total = channel(c).template total<T>();
            if (pass == 0) {
              mrel[c - c0] = total / count;
            } else {
              mean[c] = ncs_pivot<A>(x, c, S) + mrel[c - c0];
              var[c] = total / count;
            }
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          scale[c - c0] = fwd_scale(var, w, eps, c);
          shift[c - c0] = b ? static_cast<A>(b[c]) : A(0);
        }
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t o = (n * C + c0) * S;  // the block's runs of sample n: one span
          affine_span(x + o, z ? z + o : nullptr, y + o, (c1 - c0) * S, S, 0, c1 - c0, mean + c0, scale.data(),
                      shift.data(), act == Act::Relu, nt);
        }
      }
      stream_fence();
    });
  }

  template <typename T, typename W>
  static void bwd(const BatchNormShape& s, const at::Tensor& xc, const T* dy, const T* x, const T* y,
                  const acc_t<T>* mean, const acc_t<T>* var, const W* w, acc_t<T> eps, Act act, bool training,
                  acc_t<T>* sum_g, acc_t<T>* sum_gx, T* dx, T* dz) {
    using A = acc_t<T>;
    const A k = A(1) / static_cast<A>(s.count());
    const bool fused = fuse_channels(s, 2 * sizeof(T));
    const int64_t bytes = s.numel() * int64_t(sizeof(T));
    const bool nt = stream_output(bytes);  // for grad_span
    // for grad_run per run (eval)
    const bool nt_runs = stream_rows(bytes, dx ? dx : dz, (s.channels_last ? s.C : s.S) * int64_t(sizeof(T)));
    const T* const no_x = nullptr;  // eval's dx = a * g does not read x (grad_run)
    if (!training && sum_g && (dx || dz) && !fused) {
      // Eval: dx = rstd * w * g does not wait for the sums, so each row's (NSC) or run's (NCS) dx
      // is written right after its sums, from cache: x and dy are read from memory once.
      const GradCoefs<A> gc(s.C, mean, var, w, eps, nullptr, nullptr, k);
      const int64_t len = s.channels_last ? s.C : s.S;
      return bwd_reduce<T>(s, xc, dy, x, y, mean, var, eps, act, sum_g, sum_gx, [&](int64_t r) {
        const int64_t o = r * len, c = s.channels_last ? 0 : r % s.C;
        T *dxr = dx ? dx + o : nullptr, *dzr = dz ? dz + o : nullptr;
        if (s.channels_last)  // x = null: eval's dx does not read x
          grad_run<true>(dy + o, no_x, y ? y + o : nullptr, dxr, dzr, len, &gc.mu[c], &gc.a[c], &gc.kg[c], &gc.e[c],
                         nt_runs);
        else
          grad_run<false>(dy + o, no_x, y ? y + o : nullptr, dxr, dzr, len, &gc.mu[c], &gc.a[c], &gc.kg[c],
                          &gc.e[c], nt_runs);
      });
    }
    if (!sum_g || !fused)
      return compose_bwd<BatchNormBackend, T, W>(s, xc, dy, x, y, mean, var, w, eps, act, training, sum_g, sum_gx,
                                                 dx, dz);
    const int64_t C = s.C, S = s.S, cb_max = channel_block(s, 2 * sizeof(T));
    const bool eval_dx = !training && (dx || dz);  // eval: each run's dx right after its sums, from cache
    at::parallel_for(0, C, work_grain(2 * s.count()), [&](int64_t cb, int64_t ce) {
      Buf<A> ga(cb_max), gkg(cb_max), ge(cb_max);  // the block's dx coefficients
      for (int64_t c0 = cb; c0 < ce; c0 += cb_max) {
        const int64_t c1 = std::min(ce, c0 + cb_max);
        for (int64_t c = c0; c < c1; ++c) sum_g[c] = sum_gx[c] = A(0);
        for (int64_t n = 0; n < s.N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (n * C + c) * S;
            if (n + 1 < s.N) {  // this run of the next sample, as in fwd_train
              prefetch_run(x + o + C * S, S);
              prefetch_run(dy + o + C * S, S);
            }
            A pg = 0, pgx = 0;
            grad_sums_run<false>(dy + o, x + o, y ? y + o : nullptr, S, &mean[c], &pg, &pgx);
            sum_g[c] += pg;
            sum_gx[c] += pgx;
            if (eval_dx) {
              const GradCoef<A> g = grad_coef<A>(var, w, eps, c, nullptr, nullptr, k);
              grad_run<false>(dy + o, no_x, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr, S,
                              &mean[c], &g.a, &g.kg, &g.e, nt_runs);
            }
          }
        }
        for (int64_t c = c0; c < c1; ++c) sum_gx[c] /= std::sqrt(var[c] + eps);
        if (eval_dx || (!dx && !dz)) continue;
        for (int64_t c = c0; c < c1; ++c) {
          const GradCoef<A> g = grad_coef(var, w, eps, c, training ? sum_g : nullptr, sum_gx, k);
          ga[c - c0] = g.a;
          gkg[c - c0] = g.kg;
          ge[c - c0] = g.e;
        }
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t o = (n * C + c0) * S;  // the block's runs of sample n: one span
          grad_span(dy + o, x + o, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr, (c1 - c0) * S, S,
                    0, c1 - c0, mean + c0, ga.data(), gkg.data(), ge.data(), nt);
        }
      }
      stream_fence();
    });
  }

  template <typename T>
  static void stats(const BatchNormShape& s, const at::Tensor&, const T* x, acc_t<T>* mean, acc_t<T>* var) {
    using A = acc_t<T>;
    const int64_t C = s.C;
    if (!s.channels_last) {
      const int64_t S = s.S, planes = s.N * C;
      std::vector<Welford<A>> part(planes);
      at::parallel_for(0, planes, std::max<int64_t>(1, kBnChunk / S), [&](int64_t begin, int64_t end) {
        Buf<A> buf(reads_direct<T> ? 0 : std::min(S, kBnChunk));  // run_moments' converted copy
        for (int64_t p = begin; p < end; ++p) {
          const A piv = ncs_pivot<A>(x, p % C, S);
          Welford<A> w;
          for (int64_t i = 0; i < S; i += kBnChunk)
            w.merge(run_moments(x + p * S + i, std::min(kBnChunk, S - i), buf.data(), piv));
          part[p] = w;
        }
      });
      at::parallel_for(0, C, 64, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          Welford<A> w;
          for (int64_t n = 0; n < s.N; ++n) w.merge(part[n * C + c]);
          mean[c] = ncs_pivot<A>(x, c, S) + w.mean;
          var[c] = w.m2 / w.count;
        }
      });
      return;
    }
    const int64_t rows = s.count(), rpc = std::max<int64_t>(kNscRows, kBnChunk / C);
    const int64_t chunks = (rows + rpc - 1) / rpc, tasks = std::min(chunks, kBnTasks);
    std::vector<Welford<A>> part(tasks * C);
    Buf<A> piv(C);  // the first row: every chunk's moments are relative to it
    to_acc(x, piv.data(), C);
    for (A& p : piv) p = pivot_of(p);
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      Buf<A> m(C), q(C);
      for (int64_t t = tb; t < te; ++t) {
        Welford<A>* acc = part.data() + t * C;
        for (int64_t k = task_first(t, chunks, tasks); k < task_first(t + 1, chunks, tasks); ++k) {
          const int64_t r0 = k * rpc, r1 = std::min(rows, r0 + rpc);
          nsc_chunk_moments(x + r0 * C, C, r1 - r0, C, piv.data(), m.data(), q.data());
          const A len = A(r1 - r0);
          for (int64_t c = 0; c < C; ++c) {
            Welford<A> w;
            w.mean = m[c];
            w.m2 = q[c];
            w.count = len;
            acc[c].merge(w);
          }
        }
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        Welford<A> w;
        for (int64_t t = 0; t < tasks; ++t) w.merge(part[t * C + c]);
        mean[c] = piv[c] + w.mean;
        var[c] = w.m2 / w.count;
      }
    });
  }

  template <typename T, typename W>
  static void apply(const BatchNormShape& s, const at::Tensor&, const T* x, const acc_t<T>* mean, const acc_t<T>* var, const W* w,
                    const W* b, const T* z, acc_t<T> eps, Act act, T* y) {
    using A = acc_t<T>;
    const Coefs<A, W> k(s.C, mean, var, w, b, eps);
    const bool relu = act == Act::Relu, nt = stream_output(s.numel() * int64_t(sizeof(T)));
    const int64_t C = s.C;
    if (!s.channels_last) {
      const int64_t S = s.S;
      at::parallel_for(0, s.N * C, std::max<int64_t>(1, kBnChunk / S), [&](int64_t begin, int64_t end) {
        const int64_t o = begin * S;  // runs [begin, end): one span
        affine_span(x + o, z ? z + o : nullptr, y + o, (end - begin) * S, S, begin % C, C, k.mu.data(), k.scale.data(),
                    k.shift.data(), relu, nt);
        stream_fence();
      });
      return;
    }
    at::parallel_for(0, s.count(), std::max<int64_t>(1, kBnChunk / C), [&](int64_t begin, int64_t end) {
      const int64_t o = begin * C;  // rows [begin, end): one span
      affine_rows(x + o, z ? z + o : nullptr, y + o, (end - begin) * C, C, k.mu.data(), k.scale.data(),
                  k.shift.data(), relu, nt);
      stream_fence();
    });
  }

  // row_done(r) (when given) runs right after the sums of row r (channels last: the r-th row of C
  // values; contiguous: the r-th (n, c) run of S values), while the row is still in cache.
  template <typename T, typename RowDone = std::nullptr_t>
  static void bwd_reduce(const BatchNormShape& s, const at::Tensor&, const T* dy, const T* x, const T* y, const acc_t<T>* mean,
                         const acc_t<T>* var, acc_t<T> eps, Act, acc_t<T>* sum_g, acc_t<T>* sum_gx,
                         RowDone row_done = nullptr) {
    using A = acc_t<T>;
    const int64_t C = s.C;
    if (!s.channels_last) {
      const int64_t S = s.S, planes = s.N * C;
      Buf<A> pg(planes, A(0)), pgx(planes, A(0));
      at::parallel_for(0, planes, std::max<int64_t>(1, kBnChunk / S), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t o = p * S;
          grad_sums_run<false>(dy + o, x + o, y ? y + o : nullptr, S, &mean[p % C], &pg[p], &pgx[p]);
          if constexpr (!std::is_same_v<RowDone, std::nullptr_t>) row_done(p);
        }
        stream_fence();  // row_done's streamed stores
      });
      for (int64_t c = 0; c < C; ++c) {
        A a = 0, ax = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          a += pg[n * C + c];
          ax += pgx[n * C + c];
        }
        sum_g[c] = a;
        sum_gx[c] = ax / std::sqrt(var[c] + eps);
      }
      return;
    }
    const int64_t rows = s.count(), rpc = std::max<int64_t>(1, kBnChunk / C);
    const int64_t chunks = (rows + rpc - 1) / rpc, tasks = std::min(chunks, kBnTasks);
    Buf<A> pg(tasks * C, A(0)), pgx(tasks * C, A(0));
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      // each block of kBnSumRows rows summed apart, then added to its task's sums: one fp32 chain
      // per channel over a task's rows (2560 at 40x2x64x64) lost about ten times torch.nn's accuracy
      Buf<A> bg(C), bgx(C);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = task_first(t, chunks, tasks) * rpc, r1 = std::min(rows, task_first(t + 1, chunks, tasks) * rpc);
        for (int64_t rb = r0; rb < r1; rb += kBnSumRows) {
          std::fill(bg.begin(), bg.end(), A(0));
          std::fill(bgx.begin(), bgx.end(), A(0));
          for (int64_t r = rb; r < std::min(r1, rb + kBnSumRows); ++r) {
            const int64_t o = r * C;
            grad_sums_run<true>(dy + o, x + o, y ? y + o : nullptr, C, mean, bg.data(), bgx.data());
            if constexpr (!std::is_same_v<RowDone, std::nullptr_t>) row_done(r);
          }
          for (int64_t c = 0; c < C; ++c) {
            pg[t * C + c] += bg[c];
            pgx[t * C + c] += bgx[c];
          }
        }
      }
      stream_fence();  // row_done's streamed stores
    });
    for (int64_t c = 0; c < C; ++c) {
      A a = 0, ax = 0;
      for (int64_t t = 0; t < tasks; ++t) {
        a += pg[t * C + c];
        ax += pgx[t * C + c];
      }
      sum_g[c] = a;
      sum_gx[c] = ax / std::sqrt(var[c] + eps);
    }
  }

  template <typename T, typename W>
  static void bwd_elemt(const BatchNormShape& s, const at::Tensor&, const T* dy, const T* x, const T* y, const acc_t<T>* mean,
                        const acc_t<T>* var, const W* w, acc_t<T> eps, Act, const acc_t<T>* k_g,
                        const acc_t<T>* k_gx, acc_t<T> k, T* dx, T* dz) {
    using A = acc_t<T>;
    const int64_t C = s.C;
    const GradCoefs<A> gc(C, mean, var, w, eps, k_g, k_gx, k);
    const Buf<A> &mu = gc.mu, &a = gc.a, &kg = gc.kg, &e = gc.e;
    const bool nt = stream_output(s.numel() * int64_t(sizeof(T)));
    const T* xd = k_g ? x : nullptr;  // eval (no k_g): dx = a * g does not read x (grad_run)
    if (!s.channels_last) {
      const int64_t S = s.S;
      at::parallel_for(0, s.N * C, std::max<int64_t>(1, kBnChunk / S), [&](int64_t begin, int64_t end) {
        const int64_t o = begin * S;  // runs [begin, end): one span
        grad_span(dy + o, xd ? xd + o : nullptr, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr,
                  (end - begin) * S, S, begin % C, C, mu.data(), a.data(), kg.data(), e.data(), nt);
        stream_fence();
      });
      return;
    }
    at::parallel_for(0, s.count(), std::max<int64_t>(1, kBnChunk / C), [&](int64_t begin, int64_t end) {
      const int64_t o = begin * C;  // rows [begin, end): one span
      grad_rows(dy + o, xd ? xd + o : nullptr, y ? y + o : nullptr, dx ? dx + o : nullptr, dz ? dz + o : nullptr,
                (end - begin) * C, C, mu.data(), a.data(), kg.data(), e.data(), nt);
      stream_fence();
    });
  }
};

// A running statistic and its batch statistic: 1-D, C values each, on one device, the batch one fp32/fp64.
inline void check_running_pair(const at::Tensor& buf, const at::Tensor& stat) {
  TORCH_CHECK(buf.dim() == 1 && stat.dim() == 1 && buf.numel() == stat.numel(),
              "fusenorm: a running statistic of shape ", buf.sizes(), " for batch statistics of shape ", stat.sizes(),
              " (both must be 1-D, of the same size)");
  TORCH_CHECK(buf.device() == stat.device(), "fusenorm: running statistic on ", buf.device(),
              ", batch statistics on ", stat.device());
  TORCH_CHECK(stat.scalar_type() == at::kFloat || stat.scalar_type() == at::kDouble,
              "fusenorm: batch statistics must be float or double, got ", stat.scalar_type());
}

// buf <- (1 - momentum) buf + momentum * scale * stat, in fp64 (any float dtypes, any stride).
inline void update_running(const at::Tensor& buf, const at::Tensor& stat, double momentum, double scale) {
  const int64_t C = buf.numel(), bs = buf.stride(0), ss = stat.stride(0);
  FUSENORM_DISPATCH(buf.scalar_type(), buf.scalar_type(), "batch_norm_update_running", [&] {
    scalar_t* b = buf.data_ptr<scalar_t>();
    auto run = [&](const auto* s) {
      for (int64_t c = 0; c < C; ++c)
        b[c * bs] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(b[c * bs]) +
                                          momentum * scale * static_cast<double>(s[c * ss]));
    };
    if (stat.scalar_type() == at::kFloat) {
      run(stat.data_ptr<float>());
    } else {
      run(stat.data_ptr<double>());
    }
  });
}

void batch_norm_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                               const at::Tensor& var, double momentum, double unbias) {
  check_running_pair(running_mean, mean);  // both checked before either buffer changes
  check_running_pair(running_var, var);
  update_running(running_mean, mean, momentum, 1.0);
  update_running(running_var, var, momentum, unbias);
}

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  m.impl("batch_norm_update_running", &fusenorm::cpu::batch_norm_update_running);
  using Ops = fusenorm::BatchNormOps<fusenorm::cpu::BatchNormBackend>;
  m.impl("batch_norm_fwd", &Ops::batch_norm_fwd);
  m.impl("batch_norm_stats", &Ops::batch_norm_stats);
  m.impl("batch_norm_apply", &Ops::batch_norm_apply);
  m.impl("batch_norm_bwd", &Ops::batch_norm_bwd);
  m.impl("batch_norm_bwd_reduce", &Ops::batch_norm_bwd_reduce);
  m.impl("batch_norm_bwd_elemt", &Ops::batch_norm_bwd_elemt);
}

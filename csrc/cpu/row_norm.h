// CPU LayerNorm / RMSNorm over rows of a [M, N] view. Parallel over rows (at::parallel_for);
// each row is read from memory once, reduced from cache (exact two-pass) and written once.
// Two paths with the same arithmetic and summation order:
//  - SIMD (fp32 accumulation, host has AVX2/FMA/F16C): the vectors of cpu/vec.h, 16 wide on
//    AVX-512 hosts, conversions fused into the passes, the next row prefetched while the current
//    one is reduced from cache.
//  - portable (fp64, or no AVX2): plain loops over arrays that the compiler vectorizes; half
//    types go through a cache-resident fp32 copy of the row.
// Fixed-width accumulator arrays keep the summation order fixed without -ffast-math, so results
// are bitwise reproducible.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/row_norm_args.h"
#include "common/row_norm_ops.h"
#include "common/welford.h"
#include "cpu/vec.h"

namespace fusenorm::cpu {

constexpr int kLanes = 32;  // independent partial sums: four 8-wide or two 16-wide vectors of fp32

// Whether the passes over T read x itself (fp32/fp64, and half types through the SIMD passes of
// AVX2 hosts, which convert on the way) rather than a converted fp32 copy.
template <typename T>
constexpr bool reads_direct = std::is_same_v<T, acc_t<T>>
#ifdef FUSENORM_CPU_AVX2
                              || std::is_same_v<acc_t<T>, float>
#endif
    ;

// A std::vector on 64-byte boundaries, for every buffer the SIMD passes read or write: a 16-wide
// access is a whole cache line, and in a buffer from malloc (16-byte aligned) each one would span
// two lines.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const {
    return true;
  }
};
template <typename T>
using Buf = std::vector<T, CacheAligned<T>>;

// Pairwise sum of the L lanes: log-depth and vectorizable, where a running sum would cost a
// dependent add per lane (a tenth of the time of a 1024-wide row).
template <int L = kLanes, typename A>
inline A sum_lanes(A* acc) {
  for (int w = L / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// The reductions below take whole groups of kLanes values into 32 lanes, then the rest by 8 into
// 8 lanes (kTailLanes), then one value at a time, each stage's lanes summed pairwise and added to
// the total in that order. Without the 8-lane stage a row shorter than 32 values was reduced one
// dependent add at a time: LayerNorm over 24 values took 4.5x torch.nn's backward.
constexpr int kTailLanes = 8;

// Long reductions restart their 32 lanes every kSumBlock values, adding them to per-lane totals:
// a lane sums at most 32 values before they join its total, which takes one addition per block.
// Lanes that each ran over a whole long row lost precision with its length: on ReLU-like fp32
// data (many equal values) GroupNorm over 4x256x256 values erred by 2e-4 (torch.nn 9e-7; blocks
// of 4096: 3e-6, of 1024: 1.4e-6) and LayerNorm over 65536 values by 5e-5 (torch.nn 6e-7, ours
// now 1e-6), at no measurable cost. A row of up to kSumBlock values sums as before.
constexpr int64_t kSumBlock = 1024;

// Calls body(i) for i = 0, kLanes, ... over the whole groups of kLanes values in [0, n), and
// flush() after every kSumBlock values and after the last group; returns the index after the groups.
template <typename Body, typename Flush>
inline int64_t lane_blocks(int64_t n, Body&& body, Flush&& flush) {
  const int64_t end = n - n % kLanes;
  for (int64_t b = 0; b < end; b += kSumBlock) {
    const int64_t e = std::min(end, b + kSumBlock);
    for (int64_t i = b; i < e; i += kLanes) body(i);
    flush();
  }
  return end;
}

// tot[k] += acc[k], then acc[k] = 0: scalars (the portable lanes) or vectors (cpu/vec.h)
template <typename V, std::size_t K>
inline void flush_lanes(V (&tot)[K], V (&acc)[K]) {
  for (std::size_t k = 0; k < K; ++k) {
    tot[k] = tot[k] + acc[k];
    if constexpr (std::is_arithmetic_v<V>) {
      acc[k] = V(0);
    } else {
      acc[k] = V::zero();
    }
  }
}

// sum_i (v_i - c)
template <typename A>
inline A sum_of(const A* v, int64_t n, A c) {
  A acc[kLanes] = {}, tot[kLanes] = {}, t[kTailLanes] = {};
  int64_t i = lane_blocks(
      n, [&](int64_t i) {
        for (int j = 0; j < kLanes; ++j) acc[j] += v[i + j] - c;
      },
      [&] { flush_lanes(tot, acc); });
  A s = sum_lanes(tot);
  for (; i + kTailLanes <= n; i += kTailLanes)
    for (int j = 0; j < kTailLanes; ++j) t[j] += v[i + j] - c;
  s += sum_lanes<kTailLanes>(t);
  for (; i < n; ++i) s += v[i] - c;
  return s;
}

// Touch the cache lines of next[i, i + kLanes): spread over a reduction from cache, this fetches
// the next row while the arithmetic runs, a few lines at a time.
template <typename T>
inline void prefetch_lanes(const T* next, int64_t i) {
  if (!next) return;
  const char* p = reinterpret_cast<const char*>(next + i);
  for (int64_t off = 0; off < int64_t(kLanes * sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 2);
}

// sum_i ((v_i - c) - m)^2, prefetching the row `next` (of the same length) when given.
template <typename A, typename T = A>
inline A sq_dev_of(const A* v, int64_t n, A c, A m, const T* next = nullptr) {
  A acc[kLanes] = {}, tot[kLanes] = {}, t[kTailLanes] = {};
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        prefetch_lanes(next, i);
        for (int j = 0; j < kLanes; ++j) {
          A d = (v[i + j] - c) - m;
          acc[j] += d * d;
        }
      },
      [&] { flush_lanes(tot, acc); });
  A s = sum_lanes(tot);
  for (; i + kTailLanes <= n; i += kTailLanes)
    for (int j = 0; j < kTailLanes; ++j) {
      A d = (v[i + j] - c) - m;
      t[j] += d * d;
    }
  s += sum_lanes<kTailLanes>(t);
  for (; i < n; ++i) s += ((v[i] - c) - m) * ((v[i] - c) - m);
  return s;
}

// (sum_i g_i, sum_i g_i * (v_i - c)) with g = dy * w
template <typename A>
inline void grad_sums(const A* dy, const A* w, const A* v, int64_t n, A c, A& s_g, A& s_gx) {
  A a1[kLanes] = {}, a2[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, t1[kTailLanes] = {}, t2[kTailLanes] = {};
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        for (int j = 0; j < kLanes; ++j) {
          A g = dy[i + j] * w[i + j];
          a1[j] += g;
          a2[j] += g * (v[i + j] - c);
        }
      },
      [&] {
        flush_lanes(s1, a1);
        flush_lanes(s2, a2);
      });
  s_g = sum_lanes(s1);
  s_gx = sum_lanes(s2);
  for (; i + kTailLanes <= n; i += kTailLanes)
    for (int j = 0; j < kTailLanes; ++j) {
      A g = dy[i + j] * w[i + j];
      t1[j] += g;
      t2[j] += g * (v[i + j] - c);
    }
  s_g += sum_lanes<kTailLanes>(t1);
  s_gx += sum_lanes<kTailLanes>(t2);
  for (; i < n; ++i) {
    A g = dy[i] * w[i];
    s_g += g;
    s_gx += g * (v[i] - c);
  }
}

template <typename T, typename A>
inline void to_acc(const T* src, A* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}

template <typename T, typename A>
inline void from_acc(const A* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

#ifdef FUSENORM_CPU_AVX2
// The SIMD path for fp32 accumulation (fp32, half, bfloat16), written once for both widths with
// cpu/vec.h: conversions fused into the passes over the row, so the row is read once, reduced from
// cache, and the output is written once. The reductions keep 32 lanes (lane j sums the elements
// j mod 32: four 8-wide or two 16-wide accumulators), so their order is that of sum_of.

// Half/bfloat16 <-> fp32 arrays: the overloads of to_acc/from_acc that every CPU kernel after this
// point uses for half types.
template <typename H>
inline void cvt_in(const H* src, float* dst, int64_t n) {
  int64_t i = simd_for(n, [&](auto v, int64_t i) { decltype(v)::load(src + i).store(dst + i); });
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename H>
inline void cvt_out(const float* src, H* dst, int64_t n) {
  int64_t i = simd_for(n, [&](auto v, int64_t i) { decltype(v)::load(src + i).store(dst + i); });
  for (; i < n; ++i) dst[i] = static_cast<H>(src[i]);
}
inline void to_acc(const c10::Half* s, float* d, int64_t n) { cvt_in(s, d, n); }
inline void to_acc(const c10::BFloat16* s, float* d, int64_t n) { cvt_in(s, d, n); }
inline void from_acc(const float* s, c10::Half* d, int64_t n) { cvt_out(s, d, n); }
inline void from_acc(const float* s, c10::BFloat16* d, int64_t n) { cvt_out(s, d, n); }

// Lane sums in registers, in sum_lanes' order (acc[j] += acc[j + w] for w = L/2, ..., 1: each step
// adds the upper half of the lanes to the lower half), so bitwise its values; through memory, the
// partial loads after full stores stalled on store forwarding, several times per row or run
// (GroupNorm 32x64x7x7 backward spent a third of its time there).
inline float fold_lanes(Vec<8> v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v.r), _mm256_extractf128_ps(v.r, 1));  // w = 4
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                             // w = 2
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));                            // w = 1
}
#ifdef FUSENORM_CPU_AVX512
inline float fold_lanes(Vec<16> v) {  // w = 8, then as above
  return fold_lanes(Vec<8>{_mm256_add_ps(_mm512_castps512_ps256(v.r),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.r), 1)))});
}
#endif

// The 32 lanes of K accumulators of width W (lane W k + j = acc[k][j]), summed as sum_lanes does.
template <int W, int K>
inline float sum_vec_lanes(const Vec<W> (&acc)[K]) {
  static_assert(W * K == kLanes, "32 lanes");
  if constexpr (K == 2) {
    return fold_lanes(acc[0] + acc[1]);  // w = 16
  } else {
    static_assert(K == 4, "8-wide accumulators");
    return fold_lanes((acc[0] + acc[2]) + (acc[1] + acc[3]));  // w = 16, 8
  }
}

#ifdef FUSENORM_CPU_AVX512
template <bool Split>
inline float sum_vec_lanes(const Vec2<Split> (&acc)[1]) {
  Vec<16> lo, hi;
  acc[0].ordered(lo, hi);
  return fold_lanes(lo + hi);
}
#endif

// Reads a row once and returns sum_i (v_i - c), or with SQ sum_i v_i^2 (RMSNorm), in the lanes of
// sum_of. With Keep, half types are also converted into buf on the way (in order); without, the
// row is only summed, in LaneVec order (bfloat16: its even/odd halves).
template <bool SQ, bool Keep = true, typename T>
inline float load_and_sum(const T* x, float* buf, int64_t n, float c) {
  constexpr bool keep = Keep && !std::is_same_v<T, float>;
  using V = std::conditional_t<keep, VecWide, LaneVec<T>>;
  constexpr int K = kLanes / V::kWidth;
  const V cv = V::set1(c);
  V acc[K], tot[K];
  for (int k = 0; k < K; ++k) acc[k] = tot[k] = V::zero();
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        for (int k = 0; k < K; ++k) {
          const int64_t o = i + V::kWidth * k;
          const V v = V::load(x + o);
          if constexpr (keep) v.store(buf + o);
          acc[k] = SQ ? fmadd(v, v, acc[k]) : acc[k] + (v - cv);
        }
      },
      [&] { flush_lanes(tot, acc); });
  float s = i ? sum_vec_lanes(tot) : 0.f;
  if (i + kTailLanes <= n) {
    Vec<8> t = Vec<8>::zero();
    for (; i + kTailLanes <= n; i += kTailLanes) {
      const Vec<8> v = Vec<8>::load(x + i);
      if constexpr (keep) v.store(buf + i);
      t = SQ ? fmadd(v, v, t) : t + (v - Vec<8>::set1(c));
    }
    s += fold_lanes(t);
  }
  for (; i < n; ++i) {
    float v = static_cast<float>(x[i]);
    if constexpr (keep) buf[i] = v;
    s += SQ ? v * v : v - c;
  }
  return s;
}

// sum_i (x_i - c) straight from x (no conversion copy), in the lanes of sum_of.
template <typename T>
inline float sum_dev_vec(const T* x, int64_t n, float c) {
  return load_and_sum<false, false>(x, nullptr, n, c);
}

// sum_i ((v_i - c) - m)^2 in the lanes of sq_dev_of, prefetching the row `next` (of the same
// length) when given; v is fp32 (a converted row) or the row itself.
template <typename T, typename S>
inline float sq_dev_vec(const S* v, int64_t n, float c, float m, const T* next) {
  using V = LaneVec<S>;
  constexpr int K = kLanes / V::kWidth;
  const V cv = V::set1(c), mv = V::set1(m);
  V acc[K], tot[K];
  for (int k = 0; k < K; ++k) acc[k] = tot[k] = V::zero();
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        prefetch_lanes(next, i);
        for (int k = 0; k < K; ++k) {
          const V d = (V::load(v + i + V::kWidth * k) - cv) - mv;
          acc[k] = fmadd(d, d, acc[k]);
        }
      },
      [&] { flush_lanes(tot, acc); });
  float s = i ? sum_vec_lanes(tot) : 0.f;
  if (i + kTailLanes <= n) {
    Vec<8> t = Vec<8>::zero();
    for (; i + kTailLanes <= n; i += kTailLanes) {
      const Vec<8> d = (Vec<8>::load(v + i) - Vec<8>::set1(c)) - Vec<8>::set1(m);
      t = fmadd(d, d, t);
    }
    s += fold_lanes(t);
  }
  for (; i < n; ++i) {
    const float d = (static_cast<float>(v[i]) - c) - m;
    s += d * d;
  }
  return s;
}

// y_i = ((v_i - c) - mu) * rs * w_i + b_i (RMS: y_i = v_i * rs * w_i), converted and stored
// straight into the output row, prefetching the row `next` (of the same length) when given: the
// RMSNorm forward has no second pass over the row to prefetch in, and without it the next row's
// first read waits on memory (bf16 4096x4096 on the EPYC VM: 2.4-2.8 -> 1.5-2.2 ms).
template <bool RMS, typename T>
inline void normalize_store(const float* v, const float* w, const float* b, T* y, int64_t n, float c, float mu,
                            float rs, const T* next, bool nt) {
  int64_t i = simd_for(n, [&](auto z, int64_t i) {
    using V = decltype(z);
    if (next) __builtin_prefetch(next + i, 0, 2);
    if constexpr (RMS) {
      store_out(V::load(v + i) * V::set1(rs) * V::load(w + i), y + i, nt);
    } else {
      const V h = ((V::load(v + i) - V::set1(c)) - V::set1(mu)) * V::set1(rs);
      store_out(fmadd(h, V::load(w + i), V::load(b + i)), y + i, nt);
    }
  });
  for (; i < n; ++i) y[i] = static_cast<T>(RMS ? v[i] * rs * w[i] : ((v[i] - c) - mu) * rs * w[i] + b[i]);
}

// Backward, first read of a row: x and dy converted into xb/gb (half types) while summing
// s_g = sum_i g_i and s_gx = sum_i g_i (x_i - mu) with g = dy * w, lanes as in grad_sums.
template <typename T>
inline void load_grad_sums(const T* x, const T* dy, const float* w, float* xb, float* gb, int64_t n, float mu,
                           float& s_g, float& s_gx) {
  using V = VecWide;
  constexpr int K = kLanes / V::kWidth;
  const V muv = V::set1(mu);
  V a1[K], a2[K], s1[K], s2[K];
  for (int k = 0; k < K; ++k) a1[k] = a2[k] = s1[k] = s2[k] = V::zero();
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        for (int k = 0; k < K; ++k) {
          const int64_t o = i + V::kWidth * k;
          const V v = V::load(x + o), d = V::load(dy + o);
          if constexpr (!std::is_same_v<T, float>) {
            v.store(xb + o);
            d.store(gb + o);
          }
          const V g = d * V::load(w + o);
          a1[k] = a1[k] + g;
          a2[k] = fmadd(g, v - muv, a2[k]);
        }
      },
      [&] {
        flush_lanes(s1, a1);
        flush_lanes(s2, a2);
      });
  s_g = i ? sum_vec_lanes(s1) : 0.f;
  s_gx = i ? sum_vec_lanes(s2) : 0.f;
  if (i + kTailLanes <= n) {
    Vec<8> t1 = Vec<8>::zero(), t2 = Vec<8>::zero();
    for (; i + kTailLanes <= n; i += kTailLanes) {
      const Vec<8> v = Vec<8>::load(x + i), d = Vec<8>::load(dy + i);
      if constexpr (!std::is_same_v<T, float>) {
        v.store(xb + i);
        d.store(gb + i);
      }
      const Vec<8> g = d * Vec<8>::load(w + i);
      t1 = t1 + g;
      t2 = fmadd(g, v - Vec<8>::set1(mu), t2);
    }
    s_g += fold_lanes(t1);
    s_gx += fold_lanes(t2);
  }
  for (; i < n; ++i) {
    float v = static_cast<float>(x[i]), d = static_cast<float>(dy[i]);
    if constexpr (!std::is_same_v<T, float>) {
      xb[i] = v;
      gb[i] = d;
    }
    float g = d * w[i];
    s_g += g;
    s_gx += g * (v - mu);
  }
}

// Backward, second pass from cache: dx_i = rs (dy_i w_i - a - xhat_i cc) stored into dx (if
// given), and the dγ/dβ partials pw += dy xhat, pb += dy (if given). Prefetches the next row's
// x and dy (when given) while it runs. 8 wide for fp32: with 16-wide vectors this pass took twice
// as long on the AVX-512 VM (LayerNorm 4096x4096 backward, 15 -> 28-32 ms), while for half types,
// whose dx vectors are half as wide, 16 lanes are faster (bf16 12 -> 9 ms).
template <typename T>
inline void grad_store(const float* v, const float* d, const float* w, T* dx, float* pw, float* pb, int64_t n,
                       float mu, float rs, float a, float cc, const T* next_x, const T* next_dy, bool nt) {
  using V = std::conditional_t<std::is_same_v<T, float>, Vec<8>, VecWide>;
  // one vector of values at o; the 8-wide tail after the groups of 32 stores dx unstreamed
  const auto step = [=](auto t, int64_t o, bool stream) {
    using U = decltype(t);
    const U dv = U::load(d + o), rsv = U::set1(rs);
    const U xhat = (U::load(v + o) - U::set1(mu)) * rsv;
    if (dx) store_out(rsv * ((dv * U::load(w + o) - U::set1(a)) - xhat * U::set1(cc)), dx + o, stream);
    if (pw) fmadd(dv, xhat, U::load(pw + o)).store(pw + o);
    if (pb) (U::load(pb + o) + dv).store(pb + o);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_lanes(next_x, i);
    prefetch_lanes(next_dy, i);
    for (int64_t o = i; o < i + kLanes; o += V::kWidth) step(V{}, o, nt);
  }
  for (; i + 8 <= n; i += 8) step(Vec<8>{}, i, false);
  for (; i < n; ++i) {
    float xhat = (v[i] - mu) * rs;
    if (dx) dx[i] = static_cast<T>(rs * (d[i] * w[i] - a - xhat * cc));
    if (pw) pw[i] += d[i] * xhat;
    if (pb) pb[i] += d[i];
  }
}
#endif

// Output row: written in place for fp32/fp64, through the fp32 buffer `tmp` for half types.
template <typename T, typename A>
inline A* out_row(T* dst, A* tmp) {
  if constexpr (std::is_same_v<T, A>) {
    return dst;
  } else {
    return tmp;
  }
}

template <typename T, typename A>
inline void flush_row(const A* vals, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) from_acc(vals, dst, n);
}

// Row as an accumulation-type array: in place when T == A, else converted into buf.
template <typename T, typename A>
inline const A* row_as_acc(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    to_acc(src, buf, n);
    return buf;
  }
}

// Parameters as accumulation-type arrays; ones/zeros stand in for absent weight/bias.
template <typename W, typename A>
Buf<A> param_as_acc(const at::Tensor* p, int64_t n, A fill) {
  Buf<A> out(n, fill);
  if (p) {
    at::Tensor c = p->contiguous();
    to_acc(c.data_ptr<W>(), out.data(), n);
  }
  return out;
}

// Channels-last moments of a chunk of R rows of C contiguous channels (row stride ld): for every
// channel c, the mean m[c] and M2 q[c] of x - piv[c] over the rows, exact two-pass. Each sum runs
// over blocks of kNscRows rows, then over the blocks: a plain running sum of thousands of rows
// (C = 4: 4096 per chunk) would lose 1e-5 of the variance. SIMD fp32 works on blocks of 32
// channels: the accumulators stay in registers (no load/store of m and q per row) and the block's
// lines stay in L1 between its two passes, while the next block's lines are prefetched. The plain
// loops below sum in the same order.
constexpr int64_t kNscRows = 64;

#ifdef FUSENORM_CPU_AVX2
template <typename V, int K, typename T>
inline void nsc_block_moments(const T* x, int64_t ld, int64_t R, const float* piv, float* m, float* q, int64_t ahead) {
  constexpr int W = V::kWidth;
  V p[K], s[K], t[K], mu[K];
  for (int k = 0; k < K; ++k) {
    p[k] = V::load(piv + W * k);
    s[k] = V::zero();
  }
  for (int64_t r0 = 0; r0 < R; r0 += kNscRows) {
    for (int k = 0; k < K; ++k) t[k] = V::zero();
    for (int64_t r = r0; r < std::min(R, r0 + kNscRows); ++r) {
      const T* xr = x + r * ld;
      if (ahead) {  // the first and last element of the next block: its one or two lines
        __builtin_prefetch(reinterpret_cast<const char*>(xr + ahead), 0, 3);
        __builtin_prefetch(reinterpret_cast<const char*>(xr + ahead + W * K - 1), 0, 3);
      }
      for (int k = 0; k < K; ++k) t[k] = t[k] + (V::load(xr + W * k) - p[k]);
    }
    for (int k = 0; k < K; ++k) s[k] = s[k] + t[k];
  }
  const V len = V::set1(float(R));
  for (int k = 0; k < K; ++k) {
    mu[k] = s[k] / len;
    s[k] = V::zero();
  }
  for (int64_t r0 = 0; r0 < R; r0 += kNscRows) {
    for (int k = 0; k < K; ++k) t[k] = V::zero();
    for (int64_t r = r0; r < std::min(R, r0 + kNscRows); ++r) {
      const T* xr = x + r * ld;
      for (int k = 0; k < K; ++k) {
        const V d = (V::load(xr + W * k) - p[k]) - mu[k];
        t[k] = fmadd(d, d, t[k]);
      }
    }
    for (int k = 0; k < K; ++k) s[k] = s[k] + t[k];
  }
  for (int k = 0; k < K; ++k) {
    mu[k].store(m + W * k);
    s[k].store(q + W * k);
  }
}
#endif

template <typename T, typename A>
inline void nsc_chunk_moments(const T* x, int64_t ld, int64_t R, int64_t C, const A* piv, A* m, A* q) {
  int64_t c0 = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t kCols = 32;
    for (; c0 + kCols <= C; c0 += kCols) {
      const int64_t ahead = c0 + 2 * kCols <= C ? kCols : 0;
      nsc_block_moments<VecWide, kCols / VecWide::kWidth>(x + c0, ld, R, piv + c0, m + c0, q + c0, ahead);
    }
    for (; c0 + 8 <= C; c0 += 8) nsc_block_moments<Vec<8>, 1>(x + c0, ld, R, piv + c0, m + c0, q + c0, 0);
  }
#endif
  // The channels after the vectors (all of them for fp64): row by row over per-channel sums in
  // m, q and t, each channel's sums in the order of the blocks above. Channel by channel, these
  // loops walked the chunk's rows C times with a stride of ld, which made fp64 channels-last
  // GroupNorm 4-7x slower than torch.nn.
  if (c0 == C) return;
  const int64_t n = C - c0;
  Buf<A> t(n);
  A* mc = m + c0;
  A* qc = q + c0;
  const A* pc = piv + c0;
  std::fill(mc, mc + n, A(0));
  std::fill(qc, qc + n, A(0));
  for (int64_t r0 = 0; r0 < R; r0 += kNscRows) {
    std::fill(t.begin(), t.end(), A(0));
    for (int64_t r = r0; r < std::min(R, r0 + kNscRows); ++r) {
      const T* xr = x + r * ld + c0;
      for (int64_t j = 0; j < n; ++j) t[j] += static_cast<A>(xr[j]) - pc[j];
    }
    for (int64_t j = 0; j < n; ++j) mc[j] += t[j];
  }
  for (int64_t j = 0; j < n; ++j) mc[j] /= A(R);
  for (int64_t r0 = 0; r0 < R; r0 += kNscRows) {
    std::fill(t.begin(), t.end(), A(0));
    for (int64_t r = r0; r < std::min(R, r0 + kNscRows); ++r) {
      const T* xr = x + r * ld + c0;
      for (int64_t j = 0; j < n; ++j) {
        const A d = (static_cast<A>(xr[j]) - pc[j]) - mc[j];
        t[j] += d * d;
      }
    }
    for (int64_t j = 0; j < n; ++j) qc[j] += t[j];
  }
}

// Work (values) below which a parallel loop runs on the calling thread: waking the OpenMP team for
// a few thousand values cost more than the values (BatchNorm 8x16x4x4 training forward: 12.5 us,
// a third of it in libgomp, against 9.2 us on one thread). at::parallel_for runs inline when its
// range is within one grain; work_grain gives the grain for items of `per_item` values each.
constexpr int64_t kParallelWork = 32768;
inline int64_t work_grain(int64_t per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(per_item, 1));
}

template <typename T, typename W, bool RMS>
void row_norm_fwd_kernel(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias, int64_t M,
                         int64_t N, double eps, at::Tensor& y, at::Tensor* mean, at::Tensor& rstd) {
  using A = acc_t<T>;
  const Buf<A> w = param_as_acc<W, A>(weight, N, A(1));
  const Buf<A> b = param_as_acc<W, A>(bias, N, A(0));
  const T* X = x.data_ptr<T>();
  T* Y = y.data_ptr<T>();
  A* MEAN = mean ? mean->data_ptr<A>() : nullptr;
  A* RSTD = rstd.data_ptr<A>();
  const A* wp = w.data();
  const A* bp = b.data();
  [[maybe_unused]] const bool nt = stream_rows(M * N * int64_t(sizeof(T)), Y, N * int64_t(sizeof(T)));
  at::parallel_for(0, M, work_grain(N), [&](int64_t begin, int64_t end) {
    Buf<A> buf(std::is_same_v<T, A> ? 0 : N), obuf(std::is_same_v<T, A> ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
#ifdef FUSENORM_CPU_AVX2
      if constexpr (std::is_same_v<A, float>) {
        // One read of x (converted into buf on the way), one reduction from cache, one write of y.
        const T* xr = X + r * N;
        const float c = RMS ? 0.f : pivot_of(static_cast<float>(xr[0]));
        const float s = load_and_sum<RMS>(xr, buf.data(), N, c);
        const float* v = std::is_same_v<T, float> ? reinterpret_cast<const float*>(xr) : buf.data();
        const float mu = RMS ? 0.f : s / float(N);
        const T* next = r + 1 < end ? xr + N : nullptr;
        const float var = (RMS ? s : sq_dev_vec(v, N, c, mu, next)) / float(N);
        const float rs = 1.f / std::sqrt(var + static_cast<float>(eps));
        normalize_store<RMS>(v, wp, bp, Y + r * N, N, c, mu, rs, RMS ? next : nullptr, nt);
        if (MEAN) MEAN[r] = c + mu;
        RSTD[r] = rs;
        continue;
      }
#endif
      const A* v = row_as_acc(X + r * N, buf.data(), N);
      // Statistics of v - c with the pivot c = v[0] (pivot_of): exact differences keep a large mean
      // from swamping a small spread (mean 1e4, std 1e-2 in fp32).
      const A c = RMS ? A(0) : pivot_of(v[0]);
      const A mu = RMS ? A(0) : sum_of(v, N, c) / A(N);
      const A var = sq_dev_of(v, N, c, mu) / A(N);
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      A* out = out_row(Y + r * N, obuf.data());
      for (int64_t i = 0; i < N; ++i) out[i] = ((v[i] - c) - mu) * rs * wp[i] + bp[i];
      flush_row(out, Y + r * N, N);
      if (MEAN) MEAN[r] = c + mu;
      RSTD[r] = rs;
    }
    stream_fence();
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w   (RMS: no mean(g) term)
// dw = sum_rows dy * xhat, db = sum_rows dy, from per-chunk partials summed in a fixed order.
template <typename T, typename W, bool RMS>
void row_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* mean, const at::Tensor& rstd,
                         const at::Tensor* weight, int64_t M, int64_t N, bool want_dx, bool want_dw, bool want_db,
                         at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  using A = acc_t<T>;
  const Buf<A> w = param_as_acc<W, A>(weight, N, A(1));
  const T* X = x.data_ptr<T>();
  const T* DY = dy.data_ptr<T>();
  T* DX = want_dx ? dx.data_ptr<T>() : nullptr;
  const A* MEAN = mean ? mean->data_ptr<A>() : nullptr;
  const A* RSTD = rstd.data_ptr<A>();
  const bool want_params = want_dw || want_db;
  // one chunk (of per-chunk weight/bias partials) per thread, one for small inputs
  const int64_t chunks =
      M * N < kParallelWork ? 1 : std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  Buf<A> part_w(want_dw ? chunks * N : 0, A(0)), part_b(want_db ? chunks * N : 0, A(0));
  const A* wp = w.data();
  [[maybe_unused]] const bool nt = want_dx && stream_rows(M * N * int64_t(sizeof(T)), DX, N * int64_t(sizeof(T)));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    Buf<A> xbuf(std::is_same_v<T, A> ? 0 : N), dybuf(std::is_same_v<T, A> ? 0 : N),
        obuf(std::is_same_v<T, A> ? 0 : N);
    for (int64_t c = cb; c < ce; ++c) {
      A* pw = want_dw ? part_w.data() + c * N : nullptr;
      A* pb = want_db ? part_b.data() + c * N : nullptr;
      const int64_t r_end = M * (c + 1) / chunks;
      for (int64_t r = M * c / chunks; r < r_end; ++r) {
#ifdef FUSENORM_CPU_AVX2
        if constexpr (std::is_same_v<A, float>) {
          // One read of x and dy (converted on the way), one pass from cache writing dx and
          // accumulating the parameter partials.
          const T* xr = X + r * N;
          const T* dyr = DY + r * N;
          const float mu = MEAN ? MEAN[r] : 0.f;
          const float rs = RSTD[r];
          const bool half = !std::is_same_v<T, float>;
          float s_g = 0.f, s_gx = 0.f;
          load_grad_sums(xr, dyr, wp, xbuf.data(), dybuf.data(), N, mu, s_g, s_gx);
          const float* v = half ? xbuf.data() : reinterpret_cast<const float*>(xr);
          const float* d = half ? dybuf.data() : reinterpret_cast<const float*>(dyr);
          const bool more = r + 1 < r_end;
          grad_store(v, d, wp, want_dx ? DX + r * N : nullptr, pw, pb, N, mu, rs, RMS ? 0.f : s_g / float(N),
                     s_gx * rs / float(N), more ? xr + N : nullptr, more ? dyr + N : nullptr, nt);
          continue;
        }
#endif
        const A* v = row_as_acc(X + r * N, xbuf.data(), N);
        const A* g = row_as_acc(DY + r * N, dybuf.data(), N);
        const A mu = MEAN ? MEAN[r] : A(0);
        const A rs = RSTD[r];
        if (want_dx) {
          A s_g, s_gx;
          grad_sums(g, wp, v, N, mu, s_g, s_gx);
          const A a = RMS ? A(0) : s_g / A(N);
          const A cc = s_gx * rs / A(N);
          A* out = out_row(DX + r * N, obuf.data());
          for (int64_t i = 0; i < N; ++i) {
            A xhat = (v[i] - mu) * rs;
            out[i] = rs * (g[i] * wp[i] - a - xhat * cc);
          }
          flush_row(out, DX + r * N, N);
        }
        if (want_params) {
          if (pw)
            for (int64_t i = 0; i < N; ++i) pw[i] += g[i] * ((v[i] - mu) * rs);
          if (pb)
            for (int64_t i = 0; i < N; ++i) pb[i] += g[i];
        }
      }
    }
    stream_fence();
  });
  auto finish = [&](const Buf<A>& part, at::Tensor& out) {
    W* o = out.data_ptr<W>();
    at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        A s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += part[c * N + i];
        o[i] = static_cast<W>(s);
      }
    });
  };
  if (want_dw) finish(part_w, dw);
  if (want_db) finish(part_b, db);
}

// The backend that common/row_norm_ops.h wraps into ops.
struct Backend {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  template <typename T, typename W, bool RMS, typename... Args>
  static void fwd(Args&&... args) {
    row_norm_fwd_kernel<T, W, RMS>(std::forward<Args>(args)...);
  }
  template <typename T, typename W, bool RMS, typename... Args>
  static void bwd(Args&&... args) {
    row_norm_bwd_kernel<T, W, RMS>(std::forward<Args>(args)...);
  }
};

}  // namespace fusenorm::cpu

// CPU LayerNorm / RMSNorm over rows of a [M, N] view. Parallel over rows (at::parallel_for);
// each row is read from memory once: converted into a cache-resident accumulation buffer
// (or used in place for fp32/fp64), then reduced twice from cache (exact two-pass) and written.
// Hot loops are plain loops over arrays that the compiler vectorizes (-O3, host ISA flags):
// fixed-width accumulator arrays make the reductions vectorize without -ffast-math and keep
// the summation order fixed, so results are bitwise reproducible.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/row_norm_args.h"
#include "common/row_norm_ops.h"
#include "common/welford.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define FUSENORM_CPU_AVX2 1
#endif

namespace fusenorm::cpu {

constexpr int kLanes = 32;  // independent partial sums: 4 AVX2 vectors of fp32

// Pairwise sum of the lanes: log-depth and vectorizable, where a running sum would cost a
// dependent add per lane (a tenth of the time of a 1024-wide row).
template <typename A>
inline A sum_lanes(A* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// sum_i (v_i - c)
template <typename A>
inline A sum_of(const A* v, int64_t n, A c) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += v[i + j] - c;
  A s = sum_lanes(acc);
  for (; i < n; ++i) s += v[i] - c;
  return s;
}

// sum_i ((v_i - c) - m)^2
template <typename A>
inline A sq_dev_of(const A* v, int64_t n, A c, A m) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      A d = (v[i + j] - c) - m;
      acc[j] += d * d;
    }
  A s = sum_lanes(acc);
  for (; i < n; ++i) s += ((v[i] - c) - m) * ((v[i] - c) - m);
  return s;
}

// (sum_i g_i, sum_i g_i * (v_i - c)) with g = dy * w
template <typename A>
inline void grad_sums(const A* dy, const A* w, const A* v, int64_t n, A c, A& s_g, A& s_gx) {
  A a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      A g = dy[i + j] * w[i + j];
      a1[j] += g;
      a2[j] += g * (v[i + j] - c);
    }
  s_g = sum_lanes(a1);
  s_gx = sum_lanes(a2);
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
// Half/bfloat16 <-> fp32, 8 at a time (c10's scalar conversions do not vectorize).
inline void to_acc(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_acc(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void from_acc(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// Round to nearest even, NaN to the canonical quiet NaN: the same bits as c10::BFloat16(float).
inline void from_acc(const float* src, c10::BFloat16* dst, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), qnan = _mm256_set1_epi32(0x7fc0);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_loadu_ps(src + i + 8 * h);
      __m256i b = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
      __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, bias), lsb), 16);
      __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      r[h] = _mm256_blendv_epi8(t, qnan, nan);
    }
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
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
std::vector<A> param_as_acc(const at::Tensor* p, int64_t n, A fill) {
  std::vector<A> out(n, fill);
  if (p) {
    at::Tensor c = p->contiguous();
    to_acc(c.data_ptr<W>(), out.data(), n);
  }
  return out;
}

inline int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

template <typename T, typename W, bool RMS>
void row_norm_fwd_kernel(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias, int64_t M,
                         int64_t N, double eps, at::Tensor& y, at::Tensor* mean, at::Tensor& rstd) {
  using A = acc_t<T>;
  const std::vector<A> w = param_as_acc<W, A>(weight, N, A(1));
  const std::vector<A> b = param_as_acc<W, A>(bias, N, A(0));
  const T* X = x.data_ptr<T>();
  T* Y = y.data_ptr<T>();
  A* MEAN = mean ? mean->data_ptr<A>() : nullptr;
  A* RSTD = rstd.data_ptr<A>();
  const A* wp = w.data();
  const A* bp = b.data();
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : N), obuf(std::is_same_v<T, A> ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
      const A* v = row_as_acc(X + r * N, buf.data(), N);
      // Statistics of v - c with the pivot c = v[0]: exact differences keep a large mean from
      // swamping a small spread (mean 1e4, std 1e-2 in fp32).
      const A c = RMS ? A(0) : v[0];
      const A mu = RMS ? A(0) : sum_of(v, N, c) / A(N);
      const A var = sq_dev_of(v, N, c, mu) / A(N);
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      A* out = out_row(Y + r * N, obuf.data());
      for (int64_t i = 0; i < N; ++i) out[i] = ((v[i] - c) - mu) * rs * wp[i] + bp[i];
      flush_row(out, Y + r * N, N);
      if (MEAN) MEAN[r] = c + mu;
      RSTD[r] = rs;
    }
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w   (RMS: no mean(g) term)
// dw = sum_rows dy * xhat, db = sum_rows dy, from per-chunk partials summed in a fixed order.
template <typename T, typename W, bool RMS>
void row_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* mean, const at::Tensor& rstd,
                         const at::Tensor* weight, int64_t M, int64_t N, bool want_dx, bool want_dw, bool want_db,
                         at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  using A = acc_t<T>;
  const std::vector<A> w = param_as_acc<W, A>(weight, N, A(1));
  const T* X = x.data_ptr<T>();
  const T* DY = dy.data_ptr<T>();
  T* DX = want_dx ? dx.data_ptr<T>() : nullptr;
  const A* MEAN = mean ? mean->data_ptr<A>() : nullptr;
  const A* RSTD = rstd.data_ptr<A>();
  const bool want_params = want_dw || want_db;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  std::vector<A> part_w(want_dw ? chunks * N : 0, A(0)), part_b(want_db ? chunks * N : 0, A(0));
  const A* wp = w.data();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> xbuf(std::is_same_v<T, A> ? 0 : N), dybuf(std::is_same_v<T, A> ? 0 : N),
        obuf(std::is_same_v<T, A> ? 0 : N);
    for (int64_t c = cb; c < ce; ++c) {
      A* pw = want_dw ? part_w.data() + c * N : nullptr;
      A* pb = want_db ? part_b.data() + c * N : nullptr;
      for (int64_t r = M * c / chunks; r < M * (c + 1) / chunks; ++r) {
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
  });
  auto finish = [&](const std::vector<A>& part, at::Tensor& out) {
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

// fusenorm::group_norm_fwd / group_norm_bwd on CPU, both layouts (see common/group_norm_ops.h).
//
// NCS (contiguous): parallel over (n, group); a group is one contiguous run, reduced with the
// row-norm helpers (exact two-pass, pivot = its first element), then each channel's run of S sites
// is normalized, activated and stored.
// NSC (channels last): per sample, parallel over chunks of sites; every pass runs along the
// contiguous channel axis with per-channel arrays (pivot, mean, scale, bias). Statistics: each
// chunk (~16K elements, cache-resident) gets exact two-pass per-channel moments, merged per group
// (two passes over its partials, which share the group's pivot) in a fixed order, so x is read
// from memory once for them and results do not depend on the thread count; then y is written in a
// second pass.
// Backward: dz = dy * act'(z) (z recomputed from x), per-channel sums of dz and dz * xhat give
// dweight/dbias (per-sample partials summed over n in order) and the group sums for dx.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>

#include "common/activation.h"
#include "common/group_norm_ops.h"
#include "cpu/row_norm.h"

namespace fusenorm::cpu {

#ifdef FUSENORM_CPU_AVX2
// exp(x) for 8 lanes, about 1 ulp: Cody-Waite reduction by ln 2 and cephes' degree-6 polynomial.
// The SiLU passes are bound by the latency of this chain (few loop iterations fit in the
// scheduler), so it is kept short: k = round(x / ln 2) by the 1.5 * 2^23 shifter, whose low
// mantissa bits are k; the polynomial in Estrin's form; 2^k added to the exponent bits. x is
// clamped to [-86, 88.3], where k + the polynomial's exponent stays a normal exponent.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-86.f)), _mm256_set1_ps(88.3f));
  const __m256 shifter = _mm256_set1_ps(12582912.f);
  const __m256 kk = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 k = _mm256_sub_ps(kk, shifter);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r), r4 = _mm256_mul_ps(r2, r2);
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(8.3334519073e-3f), r, _mm256_set1_ps(4.1665795894e-2f));
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(1.6666665459e-1f), r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 p = _mm256_fmadd_ps(p45, r4, _mm256_fmadd_ps(p23, r2, p01));
  const __m256 e = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), _mm256_slli_epi32(_mm256_castps_si256(kk), 23)));
}

// sigmoid(z) = 1 / (1 + exp(-z)); a division: shorter than an estimate and a Newton step, exact.
inline __m256 sigmoid8(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
}

inline __m256 activate8(Act act, __m256 z) {
  switch (act) {
    case Act::Relu: return _mm256_max_ps(z, _mm256_setzero_ps());
    case Act::Silu:
      return _mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
    default: return z;
  }
}

// activate_backward for 8 lanes (ReLU, SiLU): d * act'(z), ReLU as a mask on d.
inline __m256 activate_backward8(Act act, __m256 z, __m256 d) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  if (act == Act::Relu) return _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ), d);
  const __m256 sg = sigmoid8(z);
  return _mm256_mul_ps(d, _mm256_mul_ps(sg, _mm256_fmadd_ps(z, _mm256_sub_ps(one, sg), one)));
}

#ifdef FUSENORM_CPU_AVX512
// exp8, sigmoid8 and activate8 on 16 lanes: the same operations, so bitwise the same values.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-86.f)), _mm512_set1_ps(88.3f));
  const __m512 shifter = _mm512_set1_ps(12582912.f);
  const __m512 kk = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter);
  const __m512 k = _mm512_sub_ps(kk, shifter);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r), r4 = _mm512_mul_ps(r2, r2);
  const __m512 p45 = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  const __m512 p23 = _mm512_fmadd_ps(_mm512_set1_ps(8.3334519073e-3f), r, _mm512_set1_ps(4.1665795894e-2f));
  const __m512 p01 = _mm512_fmadd_ps(_mm512_set1_ps(1.6666665459e-1f), r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 p = _mm512_fmadd_ps(p45, r4, _mm512_fmadd_ps(p23, r2, p01));
  const __m512 e = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(e), _mm512_slli_epi32(_mm512_castps_si512(kk), 23)));
}

inline __m512 activate16(Act act, __m512 z) {
  switch (act) {
    case Act::Relu: return _mm512_max_ps(z, _mm512_setzero_ps());
    case Act::Silu:
      return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    default: return z;
  }
}
#endif

// Backward, contiguous layout, one channel's run of S sites (mean mu, rstd rs, weight w, bias b):
// sb = sum dz and sw = sum dz * xhat, in 32 lanes (the order of sum_of), straight from x and dy.
// With an activation, dz is also kept in dz_out so that the dx pass does not recompute act'.
template <typename T>
inline void channel_grad_sums(const T* x, const T* dy, int64_t S, float mu, float rs, float w, float b, Act act,
                              float* dz_out, float& sb, float& sw) {
  const __m256 muv = _mm256_set1_ps(mu), rsv = _mm256_set1_ps(rs), wv = _mm256_set1_ps(w), bv = _mm256_set1_ps(b);
  __m256 ab[4], aw[4];
  for (int k = 0; k < 4; ++k) ab[k] = aw[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= S; i += kLanes)
    for (int k = 0; k < 4; ++k) {
      const __m256 xv = _mm256_mul_ps(_mm256_sub_ps(load8(x + i + 8 * k), muv), rsv);
      __m256 dv = load8(dy + i + 8 * k);
      if (act != Act::None) {
        dv = activate_backward8(act, _mm256_fmadd_ps(xv, wv, bv), dv);
        _mm256_storeu_ps(dz_out + i + 8 * k, dv);
      }
      ab[k] = _mm256_add_ps(ab[k], dv);
      aw[k] = _mm256_fmadd_ps(dv, xv, aw[k]);
    }
  sb = sum_lanes(ab);
  sw = sum_lanes(aw);
  for (; i < S; ++i) {
    const float xh = (static_cast<float>(x[i]) - mu) * rs;
    const float d = activate_backward(act, xh * w + b, static_cast<float>(dy[i]));
    if (act != Act::None) dz_out[i] = d;
    sb += d;
    sw += d * xh;
  }
}

// dx = rs (dz w - a - xhat cc) for one channel's run, straight from x and dy (or the kept dz) into dx.
template <typename T>
inline void channel_dx(const T* x, const T* dy, const float* dz, T* dx, int64_t S, float mu, float rs, float w,
                       float a, float cc) {
  const __m256 muv = _mm256_set1_ps(mu), rsv = _mm256_set1_ps(rs), wv = _mm256_set1_ps(w), av = _mm256_set1_ps(a),
               ccv = _mm256_set1_ps(cc);
  int64_t i = 0;
  for (; i + 8 <= S; i += 8) {
    const __m256 xv = _mm256_mul_ps(_mm256_sub_ps(load8(x + i), muv), rsv);
    const __m256 dv = dz ? _mm256_loadu_ps(dz + i) : load8(dy + i);
    store8(dx + i, _mm256_mul_ps(rsv, _mm256_sub_ps(_mm256_fmsub_ps(dv, wv, av), _mm256_mul_ps(xv, ccv))));
  }
  for (; i < S; ++i) {
    const float xh = (static_cast<float>(x[i]) - mu) * rs;
    const float d = dz ? dz[i] : static_cast<float>(dy[i]);
    dx[i] = static_cast<T>(rs * (d * w - a - xh * cc));
  }
}

// y_i = act(((v_i - c) - mu) * a + sh) for a run with one scale a and shift sh, converted and
// stored straight into y (GELU: through the scalar path).
template <typename T>
inline bool affine_act_store(const float* v, T* y, int64_t n, float c, float mu, float a, float sh, Act act) {
  if (act == Act::Gelu) return false;
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX512
  {
    const __m512 cv = _mm512_set1_ps(c), muv = _mm512_set1_ps(mu), av = _mm512_set1_ps(a), shv = _mm512_set1_ps(sh);
    for (; i + 16 <= n; i += 16) {
      const __m512 z = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(v + i), cv), muv), av, shv);
      store16(y + i, activate16(act, z));
    }
  }
#endif
  const __m256 cv = _mm256_set1_ps(c), muv = _mm256_set1_ps(mu), av = _mm256_set1_ps(a), shv = _mm256_set1_ps(sh);
  for (; i + 8 <= n; i += 8) {
    const __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), cv), muv), av, shv);
    store8(y + i, activate8(act, z));
  }
  for (; i < n; ++i) y[i] = static_cast<T>(activate(act, ((v[i] - c) - mu) * a + sh));
  return true;
}
#endif

// z <- act(z), in place.
template <typename A>
inline void activate_inplace(Act act, A* z, int64_t n) {
  if (act == Act::None) return;
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>)
    if (act != Act::Gelu)  // GELU's erf is scalar
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(z + i, activate8(act, _mm256_loadu_ps(z + i)));
#endif
  for (; i < n; ++i) z[i] = activate(act, z[i]);
}

// d <- d * act'(z), in place.
template <typename A>
inline void activate_backward_inplace(Act act, const A* z, A* d, int64_t n) {
  if (act == Act::None) return;
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>)
    if (act != Act::Gelu)
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, activate_backward8(act, _mm256_loadu_ps(z + i), _mm256_loadu_ps(d + i)));
#endif
  for (; i < n; ++i) d[i] = activate_backward(act, z[i], d[i]);
}

// sum_i a_i b_i, in lanes (fixed order)
template <typename A>
inline A dot_of(const A* a, const A* b, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  A s = sum_lanes(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Sites per chunk of the channels-last passes: ~16K elements, independent of the thread count.
inline int64_t site_chunk(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

struct GroupNormBackend {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    const std::vector<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    if (s.channels_last) return fwd_nsc<T, A>(s, x.data_ptr<T>(), w, b, static_cast<A>(eps), act, y.data_ptr<T>(),
                                              mean.data_ptr<A>(), rstd.data_ptr<A>());
    const int64_t S = s.S, cpg = s.cpg(), L = cpg * S;
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    A* MEAN = mean.data_ptr<A>();
    A* RSTD = rstd.data_ptr<A>();
    constexpr bool same = std::is_same_v<T, A>;  // fp32/fp64: no conversion copies
    at::parallel_for(0, s.N * s.G, row_grain(L), [&](int64_t begin, int64_t end) {
      std::vector<A> buf(same ? 0 : L), zbuf(same ? 0 : S);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t g = ng % s.G;
        const T* xg = X + ng * L;
        T* yg = Y + ng * L;
        const A c = static_cast<A>(xg[0]);
        A sum;
#ifdef FUSENORM_CPU_AVX2
        if constexpr (std::is_same_v<A, float>) {
          sum = load_and_sum<false>(xg, buf.data(), L, c);  // one read, converted into buf on the way
        } else
#endif
        {
          if constexpr (!same) to_acc(xg, buf.data(), L);
          sum = sum_of(same ? reinterpret_cast<const A*>(xg) : buf.data(), L, c);
        }
        const A* v = same ? reinterpret_cast<const A*>(xg) : buf.data();
        const A mu = sum / A(L);
        const A rs = A(1) / std::sqrt(sq_dev_of(v, L, c, mu) / A(L) + static_cast<A>(eps));
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = g * cpg + j;
          const A a = rs * w[ch], sh = b[ch];
          const A* vj = v + j * S;
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
            if (affine_act_store(vj, yg + j * S, S, c, mu, a, sh, act)) continue;
          }
#endif
          A* z = same ? reinterpret_cast<A*>(yg + j * S) : zbuf.data();
          for (int64_t i = 0; i < S; ++i) z[i] = ((vj[i] - c) - mu) * a + sh;
          activate_inplace(act, z, S);
          if constexpr (!same) from_acc(z, yg + j * S, S);
        }
        MEAN[ng] = c + mu;
        RSTD[ng] = rs;
      }
    });
  }

  template <typename T, typename A>
  static void fwd_nsc(const GroupNormShape& s, const T* X, const std::vector<A>& w, const std::vector<A>& b, A eps,
                      Act act, T* Y, A* MEAN, A* RSTD) {
    const int64_t C = s.C, S = s.S, G = s.G, cpg = s.cpg();
    const int64_t chunk = site_chunk(C), chunks = (S + chunk - 1) / chunk;
    std::vector<A> part(chunks * C), part2(chunks * C), piv(C), mu_c(C), scale(C);
    for (int64_t n = 0; n < s.N; ++n) {
      const T* xn = X + n * S * C;
      T* yn = Y + n * S * C;
      for (int64_t c = 0; c < C; ++c) piv[c] = static_cast<A>(xn[(c / cpg) * cpg]);  // group's first element
      // Per chunk and channel, the exact two-pass moments of x - pivot (the chunk is re-read from
      // cache, x from memory once): cnt[k], mean part[k][c], M2 part2[k][c].
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t k = cb; k < ce; ++k) {
          const int64_t s0 = k * chunk, s1 = std::min(S, (k + 1) * chunk);
          nsc_chunk_moments(xn + s0 * C, C, s1 - s0, C, piv.data(), part.data() + k * C, part2.data() + k * C);
        }
      });
      // Merge each group's cpg * chunks partials, in parallel over groups and in a fixed order.
      // They share the group's pivot, so two passes over them are exact as Chan's merge without
      // its division per partial: mean = sum cnt_k m_k / total, M2 = sum M2_k + cnt_k (m_k - mean)^2.
      at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
        for (int64_t g = gb; g < ge; ++g) {
          A sum = 0, m2 = 0;
          for (int64_t k = 0; k < chunks; ++k) {
            const A cnt = A(std::min(S, (k + 1) * chunk) - k * chunk);
            const A* pk = part.data() + k * C + g * cpg;
            A t = 0;
            for (int64_t j = 0; j < cpg; ++j) t += pk[j];
            sum += cnt * t;
          }
          const A mean = sum / A(cpg * S);
          for (int64_t k = 0; k < chunks; ++k) {
            const A cnt = A(std::min(S, (k + 1) * chunk) - k * chunk);
            const A *pk = part.data() + k * C + g * cpg, *qk = part2.data() + k * C + g * cpg;
            for (int64_t j = 0; j < cpg; ++j) {
              const A d = pk[j] - mean;
              m2 += qk[j] + cnt * d * d;
            }
          }
          const A rs = A(1) / std::sqrt(m2 / A(cpg * S) + eps);
          for (int64_t j = 0; j < cpg; ++j) {
            mu_c[g * cpg + j] = mean;
            scale[g * cpg + j] = rs * w[g * cpg + j];
          }
          MEAN[n * G + g] = piv[g * cpg] + mean;
          RSTD[n * G + g] = rs;
        }
      });
      // pass 3: y along the channel axis, site by site
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        std::vector<A> v(C);
        const A *pv = piv.data(), *mv = mu_c.data(), *sc = scale.data(), *sh = b.data();
        for (int64_t site = cb * chunk; site < std::min(S, ce * chunk); ++site) {
          const T* xs = xn + site * C;
          T* ys = yn + site * C;
          int64_t c0 = 0;
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
#ifdef FUSENORM_CPU_AVX512
            if (act != Act::Gelu)  // 16 channels at a time, then 8
              for (; c0 + 16 <= C; c0 += 16) {
                const __m512 d = _mm512_sub_ps(_mm512_sub_ps(load16(xs + c0), _mm512_loadu_ps(pv + c0)),
                                               _mm512_loadu_ps(mv + c0));
                store16(ys + c0, activate16(act, _mm512_fmadd_ps(d, _mm512_loadu_ps(sc + c0), _mm512_loadu_ps(sh + c0))));
              }
#endif
            if (act != Act::Gelu)  // 8 channels at a time, straight from x to y
              for (; c0 + 8 <= C; c0 += 8) {
                const __m256 d = _mm256_sub_ps(_mm256_sub_ps(load8(xs + c0), _mm256_loadu_ps(pv + c0)),
                                               _mm256_loadu_ps(mv + c0));
                store8(ys + c0, activate8(act, _mm256_fmadd_ps(d, _mm256_loadu_ps(sc + c0), _mm256_loadu_ps(sh + c0))));
              }
          }
#endif
          const int64_t rest = C - c0;
          if (rest == 0) continue;
          to_acc(xs + c0, v.data(), rest);
          for (int64_t c = 0; c < rest; ++c)
            v[c] = ((v[c] - piv[c0 + c]) - mu_c[c0 + c]) * scale[c0 + c] + b[c0 + c];
          activate_inplace(act, v.data(), rest);
          from_acc(v.data(), ys + c0, rest);
        }
      });
    }
  }

  template <typename T, typename W>
  static void bwd(const GroupNormShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                  const at::Tensor& rstd, const at::Tensor* weight, const at::Tensor* bias, Act act, bool want_dx,
                  bool want_dw, bool want_db, at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
    using A = acc_t<T>;
    const std::vector<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    // per-(n, c) sums of dz * xhat and of dz
    std::vector<A> part_w(s.N * s.C), part_b(s.N * s.C);
    if (s.channels_last) {
      bwd_nsc<T, A>(s, dy.data_ptr<T>(), x.data_ptr<T>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, act,
                    want_dx ? dx.data_ptr<T>() : nullptr, part_w, part_b);
    } else {
      bwd_ncs<T, A>(s, dy.data_ptr<T>(), x.data_ptr<T>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, act,
                    want_dx ? dx.data_ptr<T>() : nullptr, part_w, part_b);
    }
    auto finish = [&](const std::vector<A>& part, at::Tensor& out) {
      W* o = out.data_ptr<W>();
      for (int64_t c = 0; c < s.C; ++c) {
        A t = 0;
        for (int64_t n = 0; n < s.N; ++n) t += part[n * s.C + c];
        o[c] = static_cast<W>(t);
      }
    };
    if (want_dw) finish(part_w, dw);
    if (want_db) finish(part_b, db);
  }

  // dx_i = rs (dz_i w_c - a - xhat_i cc), a = sum(dz w) / L, cc = sum(dz w xhat) / L over the group
  template <typename T, typename A>
  static void bwd_ncs(const GroupNormShape& s, const T* DY, const T* X, const A* MEAN, const A* RSTD,
                      const std::vector<A>& w, const std::vector<A>& b, Act act, T* DX, std::vector<A>& part_w,
                      std::vector<A>& part_b) {
    const int64_t S = s.S, cpg = s.cpg(), L = cpg * S;
#ifdef FUSENORM_CPU_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (act != Act::Gelu) {  // each channel's run read twice (the second time from cache), no copies
        at::parallel_for(0, s.N * s.G, row_grain(2 * L), [&](int64_t begin, int64_t end) {
          std::vector<float> dz(act != Act::None ? L : 0);
          for (int64_t ng = begin; ng < end; ++ng) {
            const int64_t n = ng / s.G, g = ng % s.G;
            const float mu = MEAN[ng], rs = RSTD[ng];
            float s_g = 0, s_gx = 0;
            for (int64_t j = 0; j < cpg; ++j) {
              const int64_t ch = g * cpg + j, o = ng * L + j * S;
              float sb, sw;
              channel_grad_sums(X + o, DY + o, S, mu, rs, w[ch], b[ch], act, dz.data() + j * S, sb, sw);
              part_w[n * s.C + ch] = sw;
              part_b[n * s.C + ch] = sb;
              s_g += w[ch] * sb;
              s_gx += w[ch] * sw;
            }
            if (!DX) continue;
            for (int64_t j = 0; j < cpg; ++j) {
              const int64_t ch = g * cpg + j, o = ng * L + j * S;
              channel_dx(X + o, DY + o, dz.empty() ? nullptr : dz.data() + j * S, DX + o, S, mu, rs, w[ch],
                         s_g / float(L), s_gx / float(L));
            }
          }
        });
        return;
      }
    }
#endif
    at::parallel_for(0, s.N * s.G, row_grain(2 * L), [&](int64_t begin, int64_t end) {
      std::vector<A> xh(L), d(L), z(S);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / s.G, g = ng % s.G;
        const A mu = MEAN[ng], rs = RSTD[ng];
        to_acc(X + ng * L, xh.data(), L);
        to_acc(DY + ng * L, d.data(), L);
        for (int64_t i = 0; i < L; ++i) xh[i] = (xh[i] - mu) * rs;
        A s_g = 0, s_gx = 0;
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = g * cpg + j;
          A* dj = d.data() + j * S;
          const A* xj = xh.data() + j * S;
          if (act != Act::None) {
            for (int64_t i = 0; i < S; ++i) z[i] = xj[i] * w[ch] + b[ch];
            activate_backward_inplace(act, z.data(), dj, S);  // dj is now dz
          }
          const A sb = sum_of(dj, S, A(0)), sw = dot_of(dj, xj, S);
          part_w[n * s.C + ch] = sw;
          part_b[n * s.C + ch] = sb;
          s_g += w[ch] * sb;
          s_gx += w[ch] * sw;
        }
        if (!DX) continue;
        const A a = s_g / A(L), cc = s_gx / A(L);
        for (int64_t j = 0; j < cpg; ++j) {
          const A wc = w[g * cpg + j];
          A* dj = d.data() + j * S;
          const A* xj = xh.data() + j * S;
          for (int64_t i = 0; i < S; ++i) dj[i] = rs * (dj[i] * wc - a - xj[i] * cc);
        }
        from_acc(d.data(), DX + ng * L, L);
      }
    });
  }

  template <typename T, typename A>
  static void bwd_nsc(const GroupNormShape& s, const T* DY, const T* X, const A* MEAN, const A* RSTD,
                      const std::vector<A>& w, const std::vector<A>& b, Act act, T* DX, std::vector<A>& part_w,
                      std::vector<A>& part_b) {
    const int64_t C = s.C, S = s.S, G = s.G, cpg = s.cpg();
    const int64_t chunk = site_chunk(C), chunks = (S + chunk - 1) / chunk;
    std::vector<A> pw(chunks * C), pb(chunks * C), mu_c(C), rs_c(C), a_c(C), cc_c(C);
    // dz and xhat for one site, along the channels
    auto site_grads = [&](const T* xs, const T* ds, A* xh, A* d, A* z) {
      to_acc(xs, xh, C);
      to_acc(ds, d, C);
      for (int64_t c = 0; c < C; ++c) xh[c] = (xh[c] - mu_c[c]) * rs_c[c];
      if (act != Act::None) {
        for (int64_t c = 0; c < C; ++c) z[c] = xh[c] * w[c] + b[c];
        activate_backward_inplace(act, z, d, C);
      }
    };
    const bool vec8 = C % 8 == 0 && act != Act::Gelu;  // AVX2 fp32: 8 channels at a time, GELU scalar
    // With an activation, the AVX2 path keeps one sample's dz (fp32) from the sums pass for the dx
    // pass: act' (an exp for SiLU) is computed once per element, not twice.
    std::unique_ptr<float[]> dz_buf;
    if (vec8 && act != Act::None && std::is_same_v<A, float> && DX) dz_buf.reset(new float[S * C]);
    float* dz_keep = dz_buf.get();
    for (int64_t n = 0; n < s.N; ++n) {
      const T* xn = X + n * S * C;
      const T* dn = DY + n * S * C;
      for (int64_t c = 0; c < C; ++c) {
        mu_c[c] = MEAN[n * G + c / cpg];
        rs_c[c] = RSTD[n * G + c / cpg];
      }
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        std::vector<A> xh(C), d(C), z(C);
        for (int64_t k = cb; k < ce; ++k) {
          A* qw = pw.data() + k * C;
          A* qb = pb.data() + k * C;
          std::fill(qw, qw + C, A(0));
          std::fill(qb, qb + C, A(0));
          const int64_t s0 = k * chunk, s1 = std::min(S, (k + 1) * chunk);
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
            if (vec8) {  // site by site (dz is stored in order), 8 channels at a time
              for (int64_t site = s0; site < s1; ++site)
                for (int64_t c = 0; c < C; c += 8) {
                  const __m256 xv = _mm256_mul_ps(_mm256_sub_ps(load8(xn + site * C + c), _mm256_loadu_ps(&mu_c[c])),
                                                  _mm256_loadu_ps(&rs_c[c]));
                  __m256 dv = load8(dn + site * C + c);
                  if (act != Act::None) {
                    const __m256 z = _mm256_fmadd_ps(xv, _mm256_loadu_ps(&w[c]), _mm256_loadu_ps(&b[c]));
                    dv = activate_backward8(act, z, dv);
                    if (dz_keep) _mm256_storeu_ps(dz_keep + site * C + c, dv);
                  }
                  _mm256_storeu_ps(qw + c, _mm256_fmadd_ps(dv, xv, _mm256_loadu_ps(qw + c)));
                  _mm256_storeu_ps(qb + c, _mm256_add_ps(_mm256_loadu_ps(qb + c), dv));
                }
              continue;
            }
          }
#endif
          for (int64_t site = s0; site < s1; ++site) {
            site_grads(xn + site * C, dn + site * C, xh.data(), d.data(), z.data());
            for (int64_t c = 0; c < C; ++c) {
              qw[c] += d[c] * xh[c];
              qb[c] += d[c];
            }
          }
        }
      });
      std::vector<A> s_g(G, A(0)), s_gx(G, A(0));
      for (int64_t c = 0; c < C; ++c) {
        A tw = 0, tb = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          tw += pw[k * C + c];
          tb += pb[k * C + c];
        }
        part_w[n * C + c] = tw;
        part_b[n * C + c] = tb;
        s_g[c / cpg] += w[c] * tb;
        s_gx[c / cpg] += w[c] * tw;
      }
      if (!DX) continue;
      for (int64_t c = 0; c < C; ++c) {
        a_c[c] = s_g[c / cpg] / A(cpg * S);
        cc_c[c] = s_gx[c / cpg] / A(cpg * S);
      }
      T* dxn = DX + n * S * C;
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        std::vector<A> xh(C), d(C), z(C);
        for (int64_t site = cb * chunk; site < std::min(S, ce * chunk); ++site) {
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
            if (vec8) {  // dz from pass 1 (kept) or dy
              for (int64_t c = 0; c < C; c += 8) {
                const __m256 xv = _mm256_mul_ps(_mm256_sub_ps(load8(xn + site * C + c), _mm256_loadu_ps(&mu_c[c])),
                                                _mm256_loadu_ps(&rs_c[c]));
                const __m256 dv = act != Act::None ? _mm256_loadu_ps(dz_keep + site * C + c) : load8(dn + site * C + c);
                const __m256 t = _mm256_sub_ps(_mm256_fmsub_ps(dv, _mm256_loadu_ps(&w[c]), _mm256_loadu_ps(&a_c[c])),
                                               _mm256_mul_ps(xv, _mm256_loadu_ps(&cc_c[c])));
                store8(dxn + site * C + c, _mm256_mul_ps(_mm256_loadu_ps(&rs_c[c]), t));
              }
              continue;
            }
          }
#endif
          site_grads(xn + site * C, dn + site * C, xh.data(), d.data(), z.data());
          for (int64_t c = 0; c < C; ++c) d[c] = rs_c[c] * (d[c] * w[c] - a_c[c] - xh[c] * cc_c[c]);
          from_acc(d.data(), dxn + site * C, C);
        }
      });
    }
  }
};

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  using Ops = fusenorm::GroupNormOps<fusenorm::cpu::GroupNormBackend>;
  m.impl("group_norm_fwd", &Ops::group_norm_fwd);
  m.impl("group_norm_bwd", &Ops::group_norm_bwd);
}

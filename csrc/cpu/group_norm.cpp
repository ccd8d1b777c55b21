// fusenorm::group_norm_fwd / group_norm_bwd on CPU, both layouts (see common/group_norm_ops.h).
//
// NCS (contiguous): parallel over (n, group); a group is one contiguous run, reduced with the
// row-norm helpers (exact two-pass, pivot = its first element), then each channel's run of S sites
// is normalized, activated and stored.
// NSC (channels last): whole samples per thread when the threads share them evenly, else per
// sample, parallel over chunks of sites (over_samples); every pass runs along the
// contiguous channel axis with per-channel arrays (pivot, mean, scale, bias). Statistics: each
// chunk (~16K elements, cache-resident) gets exact two-pass per-channel moments, merged per group
// (two passes over its partials, which share the group's pivot) in a fixed order, so x is read
// from memory once for them and results do not depend on the thread count; then y is written in a
// second pass.
// Backward: dz = dy * act'(z) (z recomputed from x), per-channel sums of dz and dz * xhat give
// dweight/dbias (per-sample partials summed over n in order) and the group sums for dx.
// Activations: SIMD in fp32 accumulation (ReLU, SiLU, GELU: activate_vec); fp64 SiLU/GELU use torch's
// vectorized activation and its backward around the passes (fwd/bwd), other fp64 work is scalar.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/group_norm_ops.h"
#include "cpu/row_norm.h"

namespace fusenorm::cpu {

// The activation as a compile-time constant: the SIMD loops are instantiated per activation, so
// that they hoist its constants (a switch per vector reloaded them and the activation every
// iteration).
template <Act A>
using ActC = std::integral_constant<Act, A>;

template <typename F>
inline decltype(auto) with_act(Act act, F&& f) {
  switch (act) {
    case Act::Relu: return f(ActC<Act::Relu>{});
    case Act::Silu: return f(ActC<Act::Silu>{});
    case Act::Gelu: return f(ActC<Act::Gelu>{});
    default: return f(ActC<Act::None>{});
  }
}

// dz = d * act'(z), z = xhat w + b, except for ReLU: its mask comes from the saved output y[i] (d
// where y > 0 or y is NaN), as in torch's relu backward. Recomputed, a z within rounding of 0 could
// fall on the other side of 0 than in the forward, or round to an output of 0. y is read (and may
// be null) only with ReLU. act_grad_vec: the same on vectors.
template <typename A, typename T>
inline A act_grad(Act act, A xh, A w, A b, const T* y, int64_t i, A d) {
  return activate_backward(act, act == Act::Relu ? static_cast<A>(y[i]) : xh * w + b, d);
}

#ifdef FUSENORM_CPU_AVX2
// exp(x) on the lanes of a vector (cpu/vec.h), about 1 ulp: Cody-Waite reduction by ln 2 and
// cephes' degree-6 polynomial. The SiLU passes are bound by the latency of this chain (few loop
// iterations fit in the scheduler), so it is kept short: k = round(x / ln 2) by the 1.5 * 2^23
// shifter, whose low mantissa bits are k; the polynomial in Estrin's form; 2^k added to the
// exponent bits. x is clamped to [-86, 88.3], where k + the polynomial's exponent stays a normal
// exponent.
template <typename V>
inline V exp_vec(V x) {
  x = vmin(vmax(x, V::set1(-86.f)), V::set1(88.3f));
  const V shifter = V::set1(12582912.f);
  const V kk = fmadd(x, V::set1(1.44269504088896341f), shifter);
  const V k = kk - shifter;
  V r = fnmadd(k, V::set1(0.693359375f), x);
  r = fnmadd(k, V::set1(-2.12194440e-4f), r);
  const V r2 = r * r, r4 = r2 * r2;
  const V p45 = fmadd(V::set1(1.9875691500e-4f), r, V::set1(1.3981999507e-3f));
  const V p23 = fmadd(V::set1(8.3334519073e-3f), r, V::set1(4.1665795894e-2f));
  const V p01 = fmadd(V::set1(1.6666665459e-1f), r, V::set1(5.0000001201e-1f));
  const V p = fmadd(p45, r4, fmadd(p23, r2, p01));
  return add_to_exponent(fmadd(p, r2, r + V::set1(1.0f)), kk);
}

// c[0] + c[1] t + ... + c[K-1] t^(K-1), by Horner's rule (Estrin's scheme, tried for its shorter
// dependency chain, was 40 % slower in GroupNorm+GELU as the compiler wrote it)
template <typename V, size_t K>
inline V horner(V t, const float (&c)[K]) {
  V acc = V::set1(c[K - 1]);
  for (int k = int(K) - 2; k >= 0; --k) acc = fmadd(acc, t, V::set1(c[k]));
  return acc;
}

// GELU's 1 + erf(u), u = z / sqrt(2), and e = exp(-u^2) (its derivative's Gaussian): GELU within
// about 2e-6 relative for z > -5.6 and below 1e-8 |z| in absolute terms beyond (torch's own
// vectorized erf is off by up to 1e-7 absolute, 28 % relative for GELU's small negative outputs). Two polynomials, least-squares fits of ours (relative error,
// Chebyshev nodes, fp32 coefficients, checked with fp32 FMA arithmetic):
//   |u| < 1:  erf(u) = u P(u^2), P of degree 6;
//   |u| >= 1: erfc(|u|) = e Q(|u|), Q (that is, erfcx) of degree 10 in t = (|u| - 2.5) / 1.5 over
//             [1, 4]; |u| is clamped to 4 in Q: beyond, erfc(|u|) < 2e-8 is lost next to 2 for
//             positive z, and GELU is below 1e-8 |z| for negative z.
// The scalar path (tails, fp64) keeps the exact erf.
template <typename V>
inline V gelu_one_plus_erf(V z, V& e) {
  static constexpr float P[] = {1.1283791065216064f,  -0.3761262595653534f,    0.1128358542919159f,
                                -0.026853814721107483f, 0.005188332870602608f, -0.0008010233286768198f,
                                7.853982242522761e-05f};
  static constexpr float Q[] = {0.21080636978149414f,    -0.11152136325836182f,   0.056110333651304245f,
                                -0.026998288929462433f,  0.012489144690334797f,   -0.005609941203147173f,
                                0.002411344088613987f,   -0.0009180228225886822f, 0.00038469466380774975f,
                                -0.0002443994744680822f, 8.960837294580415e-05f};
  const V one = V::set1(1.f);
  const V u = z * V::set1(0.70710678118654752f);
  const V a = vmax(u, V::zero() - u);
  const V a2 = a * a;
  // 0 where exp_vec's clamp (at -86) would leave ~4e-38: for |z| near 1e30 and beyond that floor,
  // times z, was no longer negligible (GELU(-1e37) gave -0.03, and its derivative was off)
  e = select_lt(a2, V::set1(86.f), exp_vec(V::zero() - a2), V::zero());
  const V near = fmadd(u, horner(a2, P), one);
  const V t = fmadd(vmin(a, V::set1(4.f)), V::set1(1.f / 1.5f), V::set1(-2.5f / 1.5f));
  const V erfc_a = e * horner(t, Q);
  return select_lt(a, one, near, select_lt(u, V::zero(), erfc_a, V::set1(2.f) - erfc_a));
}

// act(z) for ReLU, SiLU (z / (1 + exp(-z)): a division, exact) and GELU (0.5 z (1 + erf(z / sqrt 2))).
template <Act A, typename V>
inline V activate_vec(ActC<A>, V z) {
  if constexpr (A == Act::Relu) {
    return vmax(V::zero(), z);  // NaN (the second operand) stays NaN, as torch.relu
  } else if constexpr (A == Act::Silu) {
    return z / (V::set1(1.f) + exp_vec(V::zero() - z));
  } else if constexpr (A == Act::Gelu) {
    V e;
    return V::set1(0.5f) * z * gelu_one_plus_erf(z, e);
  } else {
    return z;
  }
}

// d * act'(z) (ReLU, SiLU, GELU), ReLU as a mask on d.
template <Act A, typename V>
inline V activate_backward_vec(ActC<A>, V z, V d) {
  if constexpr (A == Act::Relu) {
    return relu_pass(z, d);
  } else if constexpr (A == Act::Silu) {
    const V one = V::set1(1.f);
    const V sg = one / (one + exp_vec(V::zero() - z));
    return d * (sg * fmadd(z, one - sg, one));
  } else if constexpr (A == Act::Gelu) {  // 0.5 (1 + erf(u)) + z exp(-u^2) / sqrt(2 pi)
    V e;
    const V phi = gelu_one_plus_erf(z, e);
    return d * fmadd(z * V::set1(0.39894228040143267794f), e, V::set1(0.5f) * phi);
  } else {
    return d;
  }
}

// act_grad on vectors (xv = xhat, wv, bv; the output's values from y + i)
template <Act A, typename V, typename T>
inline V act_grad_vec(ActC<A> ac, V xv, V wv, V bv, const T* y, int64_t i, V d) {
  if constexpr (A == Act::Relu) {
    return relu_pass(V::load(y + i), d);
  } else {
    return activate_backward_vec(ac, fmadd(xv, wv, bv), d);
  }
}

// Backward, contiguous layout, one channel's run of S sites (mean mu, rstd rs, weight w, bias b):
// sb = sum dz and sw = sum dz * xhat, in 32 lanes (the order of sum_of), straight from x and dy.
// With an activation, dz is also kept in dz_out so that the dx pass does not recompute act'; y is
// the run of the output (read for ReLU's mask).
template <typename T>
inline void channel_grad_sums(const T* x, const T* dy, const T* y, int64_t S, float mu, float rs, float w, float b,
                              Act act, float* dz_out, float& sb, float& sw) {
  using V = LaneVec<T>;
  constexpr int K = kLanes / V::kWidth;
  const V muv = V::set1(mu), rsv = V::set1(rs), wv = V::set1(w), bv = V::set1(b);
  V ab[K], aw[K], tot_b[K], tot_w[K];  // the lanes of a block, and their totals (lane_blocks)
  for (int k = 0; k < K; ++k) ab[k] = aw[k] = tot_b[k] = tot_w[k] = V::zero();
  int64_t i = 0;
  with_act(act, [&](auto ac) {
    i = lane_blocks(
        S,
        [&](int64_t i) {
          for (int k = 0; k < K; ++k) {
            const int64_t o = i + V::kWidth * k;
            const V xv = (V::load(x + o) - muv) * rsv;
            V dv = V::load(dy + o);
            if constexpr (decltype(ac)::value != Act::None) {
              dv = act_grad_vec(ac, xv, wv, bv, y, o, dv);
              dv.store(dz_out + o);
            }
            ab[k] = ab[k] + dv;
            aw[k] = fmadd(dv, xv, aw[k]);
          }
        },
        [&] {
          flush_lanes(tot_b, ab);
          flush_lanes(tot_w, aw);
        });
  });
  sb = i ? sum_vec_lanes(tot_b) : 0.f;
  sw = i ? sum_vec_lanes(tot_w) : 0.f;
  if (i + kTailLanes <= S) {  // as the row reductions (row_norm.h): 8 lanes, then one at a time
    using U = Vec<8>;
    U tb = U::zero(), tw = U::zero();
    with_act(act, [&](auto ac) {
      for (; i + kTailLanes <= S; i += kTailLanes) {
        const U xv = (U::load(x + i) - U::set1(mu)) * U::set1(rs);
        U dv = U::load(dy + i);
        if constexpr (decltype(ac)::value != Act::None) {
          dv = act_grad_vec(ac, xv, U::set1(w), U::set1(b), y, i, dv);
          dv.store(dz_out + i);
        }
        tb = tb + dv;
        tw = fmadd(dv, xv, tw);
      }
    });
    sb += fold_lanes(tb);
    sw += fold_lanes(tw);
  }
  for (; i < S; ++i) {
    const float xh = (static_cast<float>(x[i]) - mu) * rs;
    const float d = act_grad(act, xh, w, b, y, i, static_cast<float>(dy[i]));
    if (act != Act::None) dz_out[i] = d;
    sb += d;
    sw += d * xh;
  }
}

// dx = rs (dz w - a - xhat cc) for one channel's run, straight from x and dy (or the kept dz) into dx.
// ahead (or 0): the offset of the same channel's run in the next group, which this thread does
// next; its x and dy are prefetched, a line per vector, while this pass runs from cache (over a
// group's channels, the whole next group). The raw InstanceNorm backward at 16x64x128x128 took
// 7.7-9.1 ms fp32 and 3.7-6.1 ms bf16 against 9.5-11.3 and 5.0-6.1 without (five alternating
// runs); GroupNorm(32)+SiLU 8x320x64x64 forward+backward 13.2-14.2 ms fp32 and 10.2-10.9 bf16
// against 13.9-15.8 and 10.6-15.0 (four); the next run of the same group is in cache already.
template <typename T>
inline void channel_dx(const T* x, const T* dy, const float* dz, T* dx, int64_t S, float mu, float rs, float w,
                       float a, float cc, bool nt, int64_t ahead) {
  auto step = [&](auto z, int64_t i) {
    using V = decltype(z);
    if (ahead) {
      __builtin_prefetch(x + ahead + i, 0, 2);
      __builtin_prefetch(dy + ahead + i, 0, 2);
    }
    const V rsv = V::set1(rs);
    const V xv = (V::load(x + i) - V::set1(mu)) * rsv;
    const V dv = dz ? V::load(dz + i) : V::load(dy + i);
    store_out(rsv * (fmsub(dv, V::set1(w), V::set1(a)) - xv * V::set1(cc)), dx + i, nt);
  };
  int64_t i = dz ? simd_for(S, step) : simd_for<T>(S, step);  // the kept dz is fp32, in order
  for (; i < S; ++i) {
    const float xh = (static_cast<float>(x[i]) - mu) * rs;
    const float d = dz ? dz[i] : static_cast<float>(dy[i]);
    dx[i] = static_cast<T>(rs * (d * w - a - xh * cc));
  }
}

// y_i = act(((v_i - c) - mu) * a + sh) for a run with one scale a and shift sh, converted and
// stored straight into y.
template <typename S, typename T>
inline void affine_act_store(const S* v, T* y, int64_t n, float c, float mu, float a, float sh, Act act, bool nt) {
  int64_t i = with_act(act, [&](auto ac) {
    return simd_for<T>(n, [&](auto t, int64_t i) {
      using V = decltype(t);
      const V z = fmadd((V::load(v + i) - V::set1(c)) - V::set1(mu), V::set1(a), V::set1(sh));
      store_out(activate_vec(ac, z), y + i, nt);
    });
  });
  for (; i < n; ++i) y[i] = static_cast<T>(activate(act, ((static_cast<float>(v[i]) - c) - mu) * a + sh));
}

#endif

// z <- act(z), in place. With GELU, the n mod 8 values after the vectors go through one
// zero-padded 8-wide vector: libm's erf per value cost about as much as all the vectors of a
// channels-last site (GroupNorm+GELU at C = 60 took twice the time of C = 64). SiLU keeps libm's
// exp there (its short vector was slower). The same in activate_backward_inplace.
template <typename A>
inline void activate_inplace(Act act, A* z, int64_t n) {
  if (act == Act::None) return;
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX2
  if constexpr (std::is_same_v<A, float>)
    i = with_act(act, [&](auto ac) {
      int64_t j = simd_for(n, [&](auto t, int64_t i) { activate_vec(ac, decltype(t)::load(z + i)).store(z + i); });
      if constexpr (decltype(ac)::value == Act::Gelu) {
        if (j < n) {
          alignas(32) float v[8] = {};
          for (int64_t k = j; k < n; ++k) v[k - j] = z[k];
          activate_vec(ac, Vec<8>::load(v)).store(v);
          for (int64_t k = j; k < n; ++k) z[k] = v[k - j];
          j = n;
        }
      }
      return j;
    });
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
    i = with_act(act, [&](auto ac) {
      int64_t j = simd_for(n, [&](auto t, int64_t i) {
        using V = decltype(t);
        activate_backward_vec(ac, V::load(z + i), V::load(d + i)).store(d + i);
      });
      if constexpr (decltype(ac)::value == Act::Gelu) {
        if (j < n) {
          alignas(32) float zv[8] = {}, dv[8] = {};
          for (int64_t k = j; k < n; ++k) {
            zv[k - j] = z[k];
            dv[k - j] = d[k];
          }
          activate_backward_vec(ac, Vec<8>::load(zv), Vec<8>::load(dv)).store(dv);
          for (int64_t k = j; k < n; ++k) d[k] = dv[k - j];
          j = n;
        }
      }
      return j;
    });
#endif
  for (; i < n; ++i) d[i] = activate_backward(act, z[i], d[i]);
}

// sb = sum_i d_i and sd = sum_i d_i (x_i - mu), in lanes (fixed order), straight from d and x
// (any element types, accumulated in A)
template <typename D, typename T, typename A>
inline void sum_and_dev_dot(const D* d, const T* x, int64_t n, A mu, A& sb, A& sd) {
  A a1[kLanes] = {}, a2[kLanes] = {}, t1[kLanes] = {}, t2[kLanes] = {};
  int64_t i = lane_blocks(
      n,
      [&](int64_t i) {
        for (int j = 0; j < kLanes; ++j) {
          const A dv = static_cast<A>(d[i + j]);
          a1[j] += dv;
          a2[j] += dv * (static_cast<A>(x[i + j]) - mu);
        }
      },
      [&] {
        flush_lanes(t1, a1);
        flush_lanes(t2, a2);
      });
  sb = sum_lanes(t1);
  sd = sum_lanes(t2);
  for (; i < n; ++i) {
    const A dv = static_cast<A>(d[i]);
    sb += dv;
    sd += dv * (static_cast<A>(x[i]) - mu);
  }
}

// Sites per chunk of the channels-last passes: ~16K elements and at least 64 sites, independent of
// the thread count. With C = 1280 a chunk was 12 sites, and the passes spent their time on short
// column walks and per-chunk partials: 64 took GroupNorm(32)+SiLU 32x1280x16x16 channels-last from
// 3.4-4.6 to 2.8-4.1 ms forward (fp32; bf16 3.5-5.5 to 2.8-3.3) and 7.4-8.0 to 6.6-7.5 ms backward.
inline int64_t site_chunk(int64_t C) { return std::max<int64_t>(kNscRows, 16384 / std::max<int64_t>(C, 1)); }

// Runs f(nb, ne) over the samples [0, N) of a channels-last pass: whole samples per thread when the
// threads share them evenly (or nearly: at least 8 each); otherwise f(0, N) here, whose inner
// at::parallel_for calls then split each sample over the threads by chunks of sites (nested, they
// run inline in the first case). The chunk partials, and the order in which they are added, are the
// same either way. On 2 cores (four alternating runs), whole samples per thread took the fp32 dx
// backward from 4.2-4.3 to 3.3-3.6 ms at 64x64x32x32 and from 3.0-3.6 to 2.1-2.6 ms at
// 32x320x16x16; 3 samples on 2 threads were 15 % slower that way.
// Samples of `per_sample` values: a whole tensor of less than kParallelWork runs on this thread.
template <typename F>
void over_samples(int64_t N, int64_t per_sample, F&& f) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && N >= threads && (N % threads == 0 || N >= 8 * threads)) {
    at::parallel_for(0, N, work_grain(per_sample), f);
  } else {
    f(0, N);
  }
}

struct GroupNormBackend {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  template <typename T, typename W>
  static void fwd(const GroupNormShape& s, const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias,
                  double eps, Act act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    using A = acc_t<T>;
    if constexpr (std::is_same_v<T, double>) {
      // fp64 has no SIMD path here, and libm's exp/erf per value ran SiLU/GELU at 0.14-0.3x
      // torch.nn: normalize, then torch's vectorized activation in place (a second pass over y)
      if (act == Act::Silu || act == Act::Gelu) {
        fwd<T, W>(s, x, weight, bias, eps, Act::None, y, mean, rstd);
        if (act == Act::Silu) {
          at::silu_(y);
        } else {
          at::gelu_(y);
        }
        return;
      }
    }
    const Buf<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    if (s.channels_last) return fwd_nsc<T, A>(s, x.data_ptr<T>(), w, b, static_cast<A>(eps), act, y.data_ptr<T>(),
                                              mean.data_ptr<A>(), rstd.data_ptr<A>());
    const int64_t S = s.S, cpg = s.cpg(), L = cpg * S;
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    A* MEAN = mean.data_ptr<A>();
    A* RSTD = rstd.data_ptr<A>();
    constexpr bool direct = reads_direct<T>;  // every pass reads x itself, without a conversion copy
    [[maybe_unused]] const bool nt = stream_rows(x.numel() * int64_t(sizeof(T)), Y, S * int64_t(sizeof(T)));
    at::parallel_for(0, s.N * s.G, work_grain(L), [&](int64_t begin, int64_t end) {
      Buf<A> buf(direct ? 0 : L), zbuf(std::is_same_v<T, A> ? 0 : S);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t g = ng % s.G;
        const T* xg = X + ng * L;
        T* yg = Y + ng * L;
        const A c = pivot_of(static_cast<A>(xg[0]));
        A mu, sq;
#ifdef FUSENORM_CPU_AVX2
        if constexpr (std::is_same_v<A, float>) {  // x from memory once, then from cache; a later group prefetched
          mu = sum_dev_vec(xg, L, c) / A(L);
          // the group after next prefetched: InstanceNorm 16x64x128x128 fp32 (groups of 64 KB) took
          // 5.1-6.5 ms against 6.1-8.1 with the next one (six alternating runs)
          sq = sq_dev_vec(xg, L, c, mu, ng + 2 < end ? xg + 2 * L : nullptr);
        } else
#endif
        {
          if constexpr (!direct) to_acc(xg, buf.data(), L);
          const A* v = direct ? reinterpret_cast<const A*>(xg) : buf.data();
          mu = sum_of(v, L, c) / A(L);
          sq = sq_dev_of(v, L, c, mu);
        }
        const A rs = A(1) / std::sqrt(sq / A(L) + static_cast<A>(eps));
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = g * cpg + j;
          const A a = rs * w[ch], sh = b[ch];
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
            affine_act_store(xg + j * S, yg + j * S, S, c, mu, a, sh, act, nt);
            continue;
          }
#endif
          constexpr bool same = std::is_same_v<T, A>;
          A* z = same ? reinterpret_cast<A*>(yg + j * S) : zbuf.data();
          if constexpr (direct) {
            const T* xj = xg + j * S;
            for (int64_t i = 0; i < S; ++i) z[i] = ((static_cast<A>(xj[i]) - c) - mu) * a + sh;
          } else {
            const A* vj = buf.data() + j * S;
            for (int64_t i = 0; i < S; ++i) z[i] = ((vj[i] - c) - mu) * a + sh;
          }
          activate_inplace(act, z, S);
          if constexpr (!same) from_acc(z, yg + j * S, S);
        }
        MEAN[ng] = c + mu;
        RSTD[ng] = rs;
      }
      stream_fence();
    });
  }

  template <typename T, typename A>
  static void fwd_nsc(const GroupNormShape& s, const T* X, const Buf<A>& w, const Buf<A>& b, A eps,
                      Act act, T* Y, A* MEAN, A* RSTD) {
    const int64_t C = s.C, S = s.S, G = s.G, cpg = s.cpg();
    const int64_t chunk = site_chunk(C), chunks = (S + chunk - 1) / chunk;
    [[maybe_unused]] const bool nt = stream_output(s.N * S * C * int64_t(sizeof(T)));  // rows_for: whole lines
    over_samples(s.N, S * C, [&](int64_t nb, int64_t ne) {
      // piv, mu_c, scale and the bias padded for rows_for (kRowsPad)
      Buf<A> part(chunks * C), part2(chunks * C), piv(C + kRowsPad), mu_c(C + kRowsPad), scale(C + kRowsPad),
          shift(C + kRowsPad);
      std::copy(b.begin(), b.begin() + C, shift.begin());
      pad_rows(shift.data(), C);
      for (int64_t n = nb; n < ne; ++n) {
        const T* xn = X + n * S * C;
        T* yn = Y + n * S * C;
        for (int64_t c = 0; c < C; ++c) piv[c] = pivot_of(static_cast<A>(xn[(c / cpg) * cpg]));  // group's first element
        pad_rows(piv.data(), C);
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
        at::parallel_for(0, G, work_grain(chunks * cpg), [&](int64_t gb, int64_t ge) {
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
        pad_rows(mu_c.data(), C);
        pad_rows(scale.data(), C);
        // pass 3: y along the channel axis, over each chunk's rows as one span
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          const int64_t s0 = cb * chunk, s1 = std::min(S, ce * chunk);
          const T* xs = xn + s0 * C;
          T* ys = yn + s0 * C;
          const A *pv = piv.data(), *mv = mu_c.data(), *sc = scale.data(), *sh = shift.data();
          with_act(act, [&](auto ac) {
            constexpr Act K = decltype(ac)::value;
            const auto one = [&](int64_t i, int64_t c) {
              ys[i] = static_cast<T>(activate(K, ((static_cast<A>(xs[i]) - pv[c]) - mv[c]) * sc[c] + sh[c]));
            };
#ifdef FUSENORM_CPU_AVX2
            if constexpr (std::is_same_v<A, float>) {
              // Straight from x to y, the vectors across row ends (rows_for): site by site, C = 60
              // or 90 left 12 or 10 channels of every site to scalar code and kept the rows from
              // streaming, and GroupNorm 8x60x64x64 ran at 0.91-0.98x torch.nn.
              rows_for(
                  ys, (s1 - s0) * C, C, {pv, mv, sc, sh},
                  [=](auto t, int64_t i, const auto& k) {  // by value: the stores cannot alias them
                    using V = decltype(t);
                    store_out(activate_vec(ac, fmadd((V::load(xs + i) - k[0]) - k[1], k[2], k[3])), ys + i, nt);
                  },
                  one);
              return;
            }
#endif
            // scalar code, site by site, with the activation a constant (a switch per value kept
            // fp64 from vectorizing)
            for (int64_t o = 0; o < (s1 - s0) * C; o += C)
              for (int64_t c = 0; c < C; ++c) one(o + c, c);
          });
          stream_fence();
        });
      }
    });
  }

  template <typename T, typename W>
  static void bwd(const GroupNormShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                  const at::Tensor& rstd, const at::Tensor* weight, const at::Tensor* bias, const at::Tensor* y,
                  Act act, bool want_dx, bool want_dw, bool want_db, at::Tensor& dx, at::Tensor& dw,
                  at::Tensor& db) {
    using A = acc_t<T>;
    const Buf<A> w = param_as_acc<W, A>(weight, s.C, A(1)), b = param_as_acc<W, A>(bias, s.C, A(0));
    if constexpr (std::is_same_v<T, double>) {
      // fp64 SiLU/GELU (see fwd): dz = dy * act'(z) by torch's vectorized backward, z recomputed from
      // the saved statistics, then the backward without an activation
      if (act == Act::Silu || act == Act::Gelu) {
        at::Tensor z = at::empty_like(x), dz = at::empty_like(x);
        affine_z(s, x.data_ptr<double>(), mean.data_ptr<double>(), rstd.data_ptr<double>(), w, b,
                 z.data_ptr<double>());
        if (act == Act::Silu) {
          at::silu_backward_out(dz, dy, z);
        } else {
          at::gelu_backward_out(dz, dy, z);
        }
        return bwd<T, W>(s, dz, x, mean, rstd, weight, bias, nullptr, Act::None, want_dx, want_dw, want_db, dx, dw,
                         db);
      }
    }
    // per-(n, c) sums of dz * xhat and of dz
    Buf<A> part_w(s.N * s.C), part_b(s.N * s.C);
    const T* Y = y ? y->data_ptr<T>() : nullptr;
    if (s.channels_last) {
      bwd_nsc<T, A>(s, dy.data_ptr<T>(), x.data_ptr<T>(), Y, mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, act,
                    want_dx ? dx.data_ptr<T>() : nullptr, part_w, part_b);
    } else {
      bwd_ncs<T, A>(s, dy.data_ptr<T>(), x.data_ptr<T>(), Y, mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, act,
                    want_dx ? dx.data_ptr<T>() : nullptr, part_w, part_b);
    }
    auto finish = [&](const Buf<A>& part, at::Tensor& out) {
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

  // z = (x - mean) * rstd * w + b (fp64, either layout), the activation's input
  static void affine_z(const GroupNormShape& s, const double* X, const double* MEAN, const double* RSTD,
                       const Buf<double>& w, const Buf<double>& b, double* Z) {
    const int64_t C = s.C, S = s.S, G = s.G, cpg = s.cpg();
    at::parallel_for(0, s.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C, g = n * G + c / cpg;
        const double a = RSTD[g] * w[c], mu = MEAN[g];
        // [n, c, site] contiguous, or [n, site, c] channels last
        const int64_t base = s.channels_last ? n * S * C + c : nc * S, step = s.channels_last ? C : 1;
        for (int64_t i = 0; i < S; ++i) Z[base + i * step] = (X[base + i * step] - mu) * a + b[c];
      }
    });
  }

  // dx_i = rs (dz_i w_c - a - xhat_i cc), a = sum(dz w) / L, cc = sum(dz w xhat) / L over the group
  template <typename T, typename A>
  static void bwd_ncs(const GroupNormShape& s, const T* DY, const T* X, const T* Y, const A* MEAN, const A* RSTD,
                      const Buf<A>& w, const Buf<A>& b, Act act, T* DX, Buf<A>& part_w,
                      Buf<A>& part_b) {
    const int64_t S = s.S, cpg = s.cpg(), L = cpg * S;
#ifdef FUSENORM_CPU_AVX2
    if constexpr (std::is_same_v<A, float>) {
      // each channel's run read twice (the second time from cache), no copies
      const bool nt = stream_rows(s.N * s.C * S * int64_t(sizeof(T)), DX, S * int64_t(sizeof(T)));
      at::parallel_for(0, s.N * s.G, work_grain(2 * L), [&](int64_t begin, int64_t end) {
        Buf<float> dz(act != Act::None ? L : 0);
        for (int64_t ng = begin; ng < end; ++ng) {
          const int64_t n = ng / s.G, g = ng % s.G;
          const float mu = MEAN[ng], rs = RSTD[ng];
          float s_g = 0, s_gx = 0;
          for (int64_t j = 0; j < cpg; ++j) {
            const int64_t ch = g * cpg + j, o = ng * L + j * S;
            float sb, sw;
            channel_grad_sums(X + o, DY + o, Y ? Y + o : nullptr, S, mu, rs, w[ch], b[ch], act,
                              dz.empty() ? nullptr : dz.data() + j * S, sb, sw);
            part_w[n * s.C + ch] = sw;
            part_b[n * s.C + ch] = sb;
            s_g += w[ch] * sb;
            s_gx += w[ch] * sw;
          }
          if (!DX) continue;
          for (int64_t j = 0; j < cpg; ++j) {
            const int64_t ch = g * cpg + j, o = ng * L + j * S;
            channel_dx(X + o, DY + o, dz.empty() ? nullptr : dz.data() + j * S, DX + o, S, mu, rs, w[ch],
                       s_g / float(L), s_gx / float(L), nt, ng + 1 < end ? L : 0);
          }
        }
        stream_fence();
      });
      return;
    }
#endif
    // Straight from x and dy, without copies (fp64 copied both into buffers: 0.69-0.81x torch.nn),
    // dz kept in a buffer only with an activation.
    at::parallel_for(0, s.N * s.G, work_grain(2 * L), [&](int64_t begin, int64_t end) {
      Buf<A> dz(act != Act::None ? L : 0);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / s.G, g = ng % s.G;
        const A mu = MEAN[ng], rs = RSTD[ng];
        const T *xg = X + ng * L, *dg = DY + ng * L, *yg = Y ? Y + ng * L : nullptr;
        A s_g = 0, s_gx = 0;
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = g * cpg + j;
          const T* xj = xg + j * S;
          A sb, sd;  // sum dz, sum dz (x - mu)
          if (act != Act::None) {
            A* dj = dz.data() + j * S;
            for (int64_t i = 0; i < S; ++i)
              dj[i] = act_grad(act, (static_cast<A>(xj[i]) - mu) * rs, w[ch], b[ch], yg, j * S + i,
                               static_cast<A>(dg[j * S + i]));
            sum_and_dev_dot(dj, xj, S, mu, sb, sd);
          } else {
            sum_and_dev_dot(dg + j * S, xj, S, mu, sb, sd);
          }
          const A sw = sd * rs;
          part_w[n * s.C + ch] = sw;
          part_b[n * s.C + ch] = sb;
          s_g += w[ch] * sb;
          s_gx += w[ch] * sw;
        }
        if (!DX) continue;
        const A a = s_g / A(L), cc = s_gx / A(L) * rs;
        T* dxg = DX + ng * L;
        for (int64_t j = 0; j < cpg; ++j) {
          const A wc = w[g * cpg + j];
          const int64_t o = j * S;
          const auto dx_run = [&](const auto* dj) {
            for (int64_t i = 0; i < S; ++i)
              dxg[o + i] = static_cast<T>(rs * ((static_cast<A>(dj[i]) * wc - a) - (static_cast<A>(xg[o + i]) - mu) * cc));
          };
          if (act != Act::None) {
            dx_run(dz.data() + o);
          } else {
            dx_run(dg + o);
          }
        }
      }
    });
  }

  template <typename T, typename A>
  static void bwd_nsc(const GroupNormShape& s, const T* DY, const T* X, const T* Y, const A* MEAN, const A* RSTD,
                      const Buf<A>& w, const Buf<A>& b, Act act, T* DX, Buf<A>& part_w,
                      Buf<A>& part_b) {
    const int64_t C = s.C, S = s.S, G = s.G, cpg = s.cpg();
    const int64_t chunk = site_chunk(C), chunks = (S + chunk - 1) / chunk;
    // SIMD fp32 sums: blocks of 32 channels, then 16 and 8 channels at a time, the last C % 8
    // channels of each site scalar (with GELU, one short vector: see activate_inplace); the dx pass
    // in spans of rows (rows_for)
    const bool simd_channels = C >= 8;
    [[maybe_unused]] const bool nt = stream_output(s.N * S * C * int64_t(sizeof(T)));  // rows_for: whole lines
    auto samples = [&](int64_t nb, int64_t ne) {
      // the dx pass's coefficients padded for rows_for (kRowsPad)
      Buf<A> pw(chunks * C), pb(chunks * C), mu_c(C + kRowsPad), rs_c(C + kRowsPad), a_c(C + kRowsPad),
          cc_c(C + kRowsPad), w_c(C + kRowsPad);
      std::copy(w.begin(), w.begin() + C, w_c.begin());
      pad_rows(w_c.data(), C);
      // dz and xhat for one site, along the channels (ys: the site's output, for ReLU)
      auto site_grads = [&](const T* xs, const T* ds, const T* ys, A* xh, A* d, A* z) {
        to_acc(xs, xh, C);
        to_acc(ds, d, C);
        for (int64_t c = 0; c < C; ++c) xh[c] = (xh[c] - mu_c[c]) * rs_c[c];
        if (act == Act::Relu) {
          for (int64_t c = 0; c < C; ++c) d[c] = act_grad(act, xh[c], w[c], b[c], ys, c, d[c]);
        } else if (act != Act::None) {
          for (int64_t c = 0; c < C; ++c) z[c] = xh[c] * w[c] + b[c];
          activate_backward_inplace(act, z, d, C);
        }
      };
      // With an activation, the SIMD path keeps one sample's dz (fp32) from the sums pass for the dx
      // pass: act' (an exp for SiLU) is computed once per element, not twice.
      Buf<float> dz_buf;
      if (simd_channels && act != Act::None && std::is_same_v<A, float> && DX) dz_buf.resize(S * C);
      float* dz_keep = dz_buf.empty() ? nullptr : dz_buf.data();
      for (int64_t n = nb; n < ne; ++n) {
        const T* xn = X + n * S * C;
        const T* dn = DY + n * S * C;
        const T* yn = Y ? Y + n * S * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          mu_c[c] = MEAN[n * G + c / cpg];
          rs_c[c] = RSTD[n * G + c / cpg];
        }
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          Buf<A> xh(C), d(C), z(C);
          for (int64_t k = cb; k < ce; ++k) {
            A* qw = pw.data() + k * C;
            A* qb = pb.data() + k * C;
            std::fill(qw, qw + C, A(0));
            std::fill(qb, qb + C, A(0));
            const int64_t s0 = k * chunk, s1 = std::min(S, (k + 1) * chunk);
#ifdef FUSENORM_CPU_AVX2
            if constexpr (std::is_same_v<A, float>) {
              if (simd_channels) {
                const float *mup = mu_c.data(), *rsp = rs_c.data(), *wp = w.data(), *bp = b.data();
                with_act(act, [&](auto ac) {
                  // dz = act'(xhat w + b) dy for one vector of channels (kept in zs when given; ys
                  // the output, for ReLU)
                  const auto dz_vec = [&](auto xv, auto dv, auto wv, auto bv, const T* ys, float* zs) {
                    if constexpr (decltype(ac)::value != Act::None) {
                      dv = act_grad_vec(ac, xv, wv, bv, ys, 0, dv);
                      if (zs) dv.store(zs);
                    }
                    return dv;
                  };
                  // Blocks of 32 channels over the chunk's sites, their coefficients and sums in
                  // registers (the same operations per channel as the site loop below, so the same
                  // values): site by site, the sums went through memory at every vector, and
                  // 32x64x7x7 took 44 us against torch.nn's 19.
                  using VB = VecWide;
                  constexpr int KB = kLanes / VB::kWidth;
                  int64_t cb0 = 0;
                  for (; cb0 + kLanes <= C; cb0 += kLanes) {
                    VB mu[KB], rs[KB], wv[KB], bv[KB], aw[KB], ab[KB];
                    for (int k = 0; k < KB; ++k) {
                      const int64_t c = cb0 + VB::kWidth * k;
                      mu[k] = VB::load(mup + c);
                      rs[k] = VB::load(rsp + c);
                      wv[k] = VB::load(wp + c);
                      bv[k] = VB::load(bp + c);
                      aw[k] = VB::load(qw + c);
                      ab[k] = VB::load(qb + c);
                    }
                    const bool ahead = cb0 + 2 * kLanes <= C;  // the next block's lines, as nsc_block_moments
                    for (int64_t site = s0; site < s1; ++site) {
                      const T *xs = xn + site * C + cb0, *ds = dn + site * C + cb0;
                      const T* ys = yn ? yn + site * C + cb0 : nullptr;
                      float* zs = dz_keep ? dz_keep + site * C + cb0 : nullptr;
                      if (ahead) {
                        __builtin_prefetch(xs + kLanes, 0, 3);
                        __builtin_prefetch(xs + 2 * kLanes - 1, 0, 3);
                        __builtin_prefetch(ds + kLanes, 0, 3);
                        __builtin_prefetch(ds + 2 * kLanes - 1, 0, 3);
                      }
                      for (int k = 0; k < KB; ++k) {
                        const VB xv = (VB::load(xs + VB::kWidth * k) - mu[k]) * rs[k];
                        const VB dv = dz_vec(xv, VB::load(ds + VB::kWidth * k), wv[k], bv[k],
                                             ys ? ys + VB::kWidth * k : nullptr, zs ? zs + VB::kWidth * k : nullptr);
                        aw[k] = fmadd(dv, xv, aw[k]);
                        ab[k] = ab[k] + dv;
                      }
                    }
                    for (int k = 0; k < KB; ++k) {
                      aw[k].store(qw + cb0 + VB::kWidth * k);
                      ab[k].store(qb + cb0 + VB::kWidth * k);
                    }
                  }
                  if (cb0 == C) return;
                  // the channels after the blocks: site by site (dz is stored in order), 16 then 8
                  // channels at a time
                  for (int64_t site = s0; site < s1; ++site) {
                    const T *xs = xn + site * C, *ds = dn + site * C;
                    const T* ys = yn ? yn + site * C : nullptr;
                    float* zs = dz_keep ? dz_keep + site * C : nullptr;
                    const int64_t c0 = cb0 + simd_for(C - cb0, [&](auto t, int64_t j) {
                      using V = decltype(t);
                      const int64_t c = cb0 + j;
                      const V xv = (V::load(xs + c) - V::load(mup + c)) * V::load(rsp + c);
                      const V dv = dz_vec(xv, V::load(ds + c), V::load(wp + c), V::load(bp + c), ys ? ys + c : nullptr,
                                          zs ? zs + c : nullptr);
                      fmadd(dv, xv, V::load(qw + c)).store(qw + c);
                      (V::load(qb + c) + dv).store(qb + c);
                    });
                    if constexpr (decltype(ac)::value == Act::Gelu) {  // see activate_inplace
                      if (c0 < C) {
                        float xh[8], z[8], dv[8];
                        for (int64_t c = c0; c < C; ++c) {
                          xh[c - c0] = (static_cast<float>(xs[c]) - mup[c]) * rsp[c];
                          z[c - c0] = xh[c - c0] * wp[c] + bp[c];
                          dv[c - c0] = static_cast<float>(ds[c]);
                        }
                        activate_backward_inplace(Act::Gelu, z, dv, C - c0);
                        for (int64_t c = c0; c < C; ++c) {
                          if (zs) zs[c] = dv[c - c0];
                          qw[c] += dv[c - c0] * xh[c - c0];
                          qb[c] += dv[c - c0];
                        }
                      }
                      continue;
                    }
                    for (int64_t c = c0; c < C; ++c) {
                      const float xh = (static_cast<float>(xs[c]) - mup[c]) * rsp[c];
                      float dv = static_cast<float>(ds[c]);
                      if (act != Act::None) {
                        dv = act_grad(act, xh, wp[c], bp[c], ys, c, dv);
                        if (zs) zs[c] = dv;
                      }
                      qw[c] += dv * xh;
                      qb[c] += dv;
                    }
                  }
                });
                continue;
              }
            }
#endif
            for (int64_t site = s0; site < s1; ++site) {
              site_grads(xn + site * C, dn + site * C, yn ? yn + site * C : nullptr, xh.data(), d.data(), z.data());
              for (int64_t c = 0; c < C; ++c) {
                qw[c] += d[c] * xh[c];
                qb[c] += d[c];
              }
            }
          }
        });
        Buf<A> s_g(G, A(0)), s_gx(G, A(0));
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
        for (Buf<A>* v : {&mu_c, &rs_c, &a_c, &cc_c}) pad_rows(v->data(), C);
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          const int64_t s0 = cb * chunk, s1 = std::min(S, ce * chunk);
#ifdef FUSENORM_CPU_AVX2
          if constexpr (std::is_same_v<A, float>) {
            if (dz_keep || act == Act::None) {  // dz from pass 1 (kept) or dy
              const float *mup = mu_c.data(), *rsp = rs_c.data(), *wp = w_c.data(), *ap = a_c.data(), *ccp = cc_c.data();
              const T* xs = xn + s0 * C;
              T* dxs = dxn + s0 * C;
              // the chunk's rows as one span, the vectors across row ends (rows_for), as the forward
              auto span = [&](const auto* ds) {
                rows_for(
                    dxs, (s1 - s0) * C, C, {mup, rsp, wp, ap, ccp},
                    [=](auto t, int64_t i, const auto& k) {
                      using V = decltype(t);
                      const V xv = (V::load(xs + i) - k[0]) * k[1];
                      store_out(k[1] * (fmsub(V::load(ds + i), k[2], k[3]) - xv * k[4]), dxs + i, nt);
                    },
                    [&](int64_t i, int64_t c) {
                      const float xh = (static_cast<float>(xs[i]) - mup[c]) * rsp[c];
                      dxs[i] = static_cast<T>(rsp[c] * ((static_cast<float>(ds[i]) * wp[c] - ap[c]) - xh * ccp[c]));
                    });
              };
              if (dz_keep) {
                span(static_cast<const float*>(dz_keep) + s0 * C);
              } else {
                span(dn + s0 * C);
              }
              stream_fence();
              return;
            }
          }
#endif
          Buf<A> xh(C), d(C), z(C);
          for (int64_t site = s0; site < s1; ++site) {
            site_grads(xn + site * C, dn + site * C, yn ? yn + site * C : nullptr, xh.data(), d.data(), z.data());
            for (int64_t c = 0; c < C; ++c) d[c] = rs_c[c] * (d[c] * w[c] - a_c[c] - xh[c] * cc_c[c]);
            from_acc(d.data(), dxn + site * C, C);
          }
        });
      }
    };
    over_samples(s.N, s.S * s.C, samples);
  }
};

}  // namespace fusenorm::cpu

TORCH_LIBRARY_IMPL(fusenorm, CPU, m) {
  using Ops = fusenorm::GroupNormOps<fusenorm::cpu::GroupNormBackend>;
  m.impl("group_norm_fwd", &Ops::group_norm_fwd);
  m.impl("group_norm_bwd", &Ops::group_norm_bwd);
}

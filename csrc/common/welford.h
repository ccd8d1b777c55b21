// Mergeable running statistics (count, mean, M2), usable on host and device.
// Every norm reduces with these or with an exact two-pass over data already on chip;
// never with E[x^2] - E[x]^2.
#pragma once
#include <c10/macros/Macros.h>

namespace fusenorm {

// Accumulation type: fp32 for fp32/half/bfloat16, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// The mean of two parts of n1 and n2 values (n = n1 + n2) with means m1 and m2, given d = m2 - m1
// and f2 = n2 / n: m1 + d f2. Where d is not finite (a part's mean is infinite, or the difference
// overflows), that would be inf - inf; the weighted sum m1 n1 / n + m2 f2 keeps the mean of data
// holding one infinity infinite, as torch's.
template <typename A>
C10_HOST_DEVICE inline A merged_mean(A m1, A m2, A d, A n1, A n, A f2) {
  return d - d == A(0) ? m1 + d * f2 : m1 * (n1 / n) + m2 * f2;
}

// The running mean m of some values with v added, given d = v - m and inv = 1 / (their count + 1):
// m + d inv, or, where d is not finite, the weighted m (1 - inv) + v inv (as merged_mean).
template <typename A>
C10_HOST_DEVICE inline A added_mean(A m, A v, A d, A inv) {
  return d - d == A(0) ? m + d * inv : m * (A(1) - inv) + v * inv;
}

template <typename A>
struct Welford {
  A mean = 0;
  A m2 = 0;
  A count = 0;

  // Chan et al. parallel merge.
  C10_HOST_DEVICE void merge(const Welford& o) {
    if (o.count == 0) return;
    if (count == 0) {
      *this = o;
      return;
    }
    A n = count + o.count;
    A d = o.mean - mean;
    A f = o.count / n;
    mean = merged_mean(mean, o.mean, d, count, n, f);
    m2 += o.m2 + d * d * count * f;
    count = n;
  }
};

// The pivot of an exact two-pass reduction, given the data's first value v: statistics are taken
// of x - pivot, so that a large mean does not swamp a small spread (mean 1e4, std 1e-2 in fp32).
// An infinite (or NaN) v would make every difference NaN, where the mean of data holding one
// infinity is that infinity (torch's running_mean gets inf): such a v gives the pivot 0. v - v is 0
// exactly for every finite v and NaN otherwise.
template <typename A>
C10_HOST_DEVICE inline A pivot_of(A v) {
  return v - v == A(0) ? v : A(0);
}

}  // namespace fusenorm

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

template <typename A>
struct Welford {
  A mean = 0;
  A m2 = 0;
  A count = 0;

  C10_HOST_DEVICE void add(A x) {
    count += 1;
    A d = x - mean;
    mean += d / count;
    m2 += d * (x - mean);
  }

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
    mean += d * f;
    m2 += o.m2 + d * d * count * f;
    count = n;
  }
};

}  // namespace fusenorm

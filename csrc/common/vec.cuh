// 16-byte vector accesses with an alignment check; kernels fall back to scalar code otherwise.
#pragma once
#include <cstdint>

#include "common/simt.cuh"

namespace fusenorm::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// The vi-th V-wide vector of p. The launcher has checked the alignment (is_aligned); the host
// emulator checks it again, as the device would fault.
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p, int64_t vi) {
  const Vec<T, V>* q = reinterpret_cast<const Vec<T, V>*>(p) + vi;
  FUSENORM_CHECK_ALIGNED(q, sizeof(Vec<T, V>));
  return *q;
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t vi, const Vec<T, V>& v) {
  Vec<T, V>* q = reinterpret_cast<Vec<T, V>*>(p) + vi;
  FUSENORM_CHECK_ALIGNED(q, sizeof(Vec<T, V>));
  *q = v;
}

}  // namespace fusenorm::cuda

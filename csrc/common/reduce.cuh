// Warp and block reductions shared by every CUDA kernel. Deterministic: a fixed shuffle tree.
#pragma once
#include "common/simt.cuh"

namespace fusenorm::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane gets the result.
template <typename A>
__device__ __forceinline__ A warp_allsum(A v, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) {
    if constexpr (FUSENORM_PLANTED(2)) {
      v += __shfl_down_sync(kFullMask, v, o, width);  // planted: only the first lane gets the sum
    } else {
      v += __shfl_xor_sync(kFullMask, v, o, width);
    }
  }
  return v;
}

// Sum over the whole block; every thread gets the result. `shared` holds 32 values.
// Every thread of the block must call it (it contains barriers).
template <typename A>
__device__ __forceinline__ A block_allsum(A v, A* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_allsum(v);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  if constexpr (!FUSENORM_PLANTED(1)) __syncthreads();  // planted: readers race the writers
  v = lane < nwarps ? shared[lane] : A(0);
  return warp_allsum(v);
}

// Sum over a row held by G threads: a sub-warp, a warp, or (G > 32) the whole block.
template <int G, typename A>
__device__ __forceinline__ A row_allsum(A v, A* shared) {
  if constexpr (G <= 32) {
    return warp_allsum(v, G);
  } else {
    return block_allsum(v, shared);
  }
}

}  // namespace fusenorm::cuda

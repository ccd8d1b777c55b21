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

// out[n] = sum_b part[b, n], in a fixed order.
template <typename A, typename W>
__global__ void __launch_bounds__(512) column_sum_kernel(const A* __restrict__ part, int64_t B, int64_t N,
                                                         W* __restrict__ out) {
  __shared__ A tile[16][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A s = A(0);
  if (col < N)
    for (int64_t r = threadIdx.y; r < B; r += 16) s += part[r * N + col];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    A t = A(0);
#pragma unroll
    for (int r = 0; r < 16; ++r) t += tile[r][threadIdx.x];
    out[col] = static_cast<W>(t);
  }
}

}  // namespace fusenorm::cuda

// The few wrappers between the CUDA kernels in csrc/cuda/ and what runs them.
//
// Under nvcc they are the real thing: <<<>>> launches with launch checks, CUDA runtime queries,
// the device intrinsics. With FUSENORM_SIMT_HOST defined (tests only) the same kernel source
// compiles as host C++ and runs on the CPU through the emulator in common/simt_host.h: every
// block of the grid with its blockDim threads, real __syncthreads barriers and warp shuffles.
//
// Kernel code uses plain CUDA (threadIdx, __shared__, __syncthreads, __shfl_xor_sync) plus:
//   FUSENORM_DYNAMIC_SMEM(T, name)        extern __shared__ T name[]
//   load_vec / store_vec (common/vec.cuh) 16-byte accesses, alignment checked by the emulator
//   simt::rsqrt, simt::mul_rn             intrinsics with a host equivalent
//   simt::cluster_*                       thread block clusters (sm_90+; elsewhere, and in the
//                                         emulator, every block is a cluster of one)
// and host code launches with simt::launch(kernel, grid, block, smem, stream, args...), or
// simt::launch_cluster(kernel, grid, block, smem, stream, cluster_blocks, args...).
//
// FUSENORM_PLANT_BUG = n compiles in a known bug (tests/test_simt.py shows the emulator catches
// each); FUSENORM_PLANTED(n) is false in every real build.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#ifndef FUSENORM_PLANT_BUG
#define FUSENORM_PLANT_BUG 0
#endif
#define FUSENORM_PLANTED(n) (FUSENORM_PLANT_BUG == (n))

#ifdef FUSENORM_SIMT_HOST
#include "common/simt_host.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#define FUSENORM_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define FUSENORM_CHECK_ALIGNED(ptr, bytes) ((void)0)

namespace fusenorm::simt {

__device__ __forceinline__ float rsqrt(float v) { return ::rsqrtf(v); }
__device__ __forceinline__ double rsqrt(double v) { return ::rsqrt(v); }
// A product rounded once, never contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Thread block clusters: the blocks of one cluster run at the same time and can read each other's
// shared memory (cluster_map). Compiled for an architecture without them, a block is its own
// cluster and cluster_sync is __syncthreads.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ int cluster_blocks() { return static_cast<int>(cooperative_groups::this_cluster().num_blocks()); }
__device__ __forceinline__ int cluster_rank() { return static_cast<int>(cooperative_groups::this_cluster().block_rank()); }
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
}
#else
__device__ __forceinline__ int cluster_blocks() { return 1; }
__device__ __forceinline__ int cluster_rank() { return 0; }
__device__ __forceinline__ void cluster_sync() { __syncthreads(); }
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int) {
  return p;
}
#endif

struct DeviceLimits {
  int sms = 0;          // multiprocessors
  int smem_optin = 0;   // dynamic shared memory a block may opt in to, in bytes
  int max_cluster = 1;  // blocks per cluster: 16 (8 portable, 16 opted in) from sm_90, else 1
};

inline DeviceLimits device_limits(int dev) {
  static DeviceLimits cache[64];
  DeviceLimits& d = cache[dev & 63];
  if (d.sms == 0) {
    int cluster = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, dev));
    d.max_cluster = cluster ? 16 : 1;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  }
  return d;
}

template <typename... P>
int max_active_blocks(void (*kernel)(P...), int threads, size_t smem) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n;
}

// The PTX (virtual architecture) version `kernel` was compiled for on the current device, e.g. 90
// (what __CUDA_ARCH__ was in the code that runs), and its static shared memory in bytes.
struct KernelInfo {
  int ptx_version = 0;
  size_t static_smem = 0;
};
template <typename... P>
KernelInfo kernel_info(void (*kernel)(P...)) {
  cudaFuncAttributes a;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  return {a.ptxVersion, a.sharedSizeBytes};
}

// Lets `kernel` take more than the default 48 KiB of dynamic shared memory.
template <typename... P>
void allow_dynamic_smem(void (*kernel)(P...), size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A launch configuration in clusters of `cluster` blocks along x, its attribute held in `attr`; a
// cluster above 8 blocks is opted in first.
template <typename... P>
cudaLaunchConfig_t cluster_config(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                  int cluster, cudaLaunchAttribute& attr) {
  if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// A launch in clusters of `cluster` consecutive blocks along x (grid.x a multiple of it).
// cluster == 1 is a plain launch.
template <typename... P, typename... Args>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int cluster,
                    Args&&... args) {
  if (cluster == 1) return launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(kernel, grid, block, smem, stream, cluster, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Clusters of `cluster` blocks (each `block` threads, `smem` bytes) the device can hold at once;
// 0: such a cluster cannot be launched. cluster == 1: whether one block fits.
template <typename... P>
int max_active_clusters(void (*kernel)(P...), int cluster, int threads, size_t smem) {
  if (cluster == 1) return max_active_blocks(kernel, threads, smem) > 0 ? 1 : 0;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(kernel, dim3(static_cast<unsigned>(cluster)),
                                                dim3(static_cast<unsigned>(threads)), smem, nullptr, cluster, attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a configuration the device refuses: report none
    return 0;
  }
  return n;
}

struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& x) : guard(x.device()) {}
};

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace fusenorm::simt
#endif

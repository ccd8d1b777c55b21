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
// and host code launches with simt::launch(kernel, grid, block, smem, stream, args...).
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
#include <cuda_runtime.h>

#define FUSENORM_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define FUSENORM_CHECK_ALIGNED(ptr, bytes) ((void)0)

namespace fusenorm::simt {

__device__ __forceinline__ float rsqrt(float v) { return ::rsqrtf(v); }
__device__ __forceinline__ double rsqrt(double v) { return ::rsqrt(v); }
// A product rounded once, never contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

struct DeviceLimits {
  int sms = 0;         // multiprocessors
  int smem_optin = 0;  // dynamic shared memory a block may opt in to, in bytes
};

inline DeviceLimits device_limits(int dev) {
  static DeviceLimits cache[64];
  DeviceLimits& d = cache[dev & 63];
  if (d.sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
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

struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& x) : guard(x.device()) {}
};

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace fusenorm::simt
#endif

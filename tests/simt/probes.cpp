// Small kernels that check the emulator itself (tests/test_simt.py::test_emulator_*): shuffles
// against CUDA's rules, and the errors it must raise instead of hanging or passing silently.
#include <ATen/ops/full.h>

#include "simt_lib.h"

namespace {

using fusenorm::cuda::load_vec;
using fusenorm::cuda::Vec;

// out[t] = the shuffle of `kind` (0 idx, 1 up, 2 down, 3 xor) of the value t, with arg and width.
__global__ void shuffle_kernel(int kind, int arg, int width, int* out) {
  const int v = static_cast<int>(threadIdx.x);
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}

// Each thread reads its neighbour's shared-memory slot, with (or without) the barrier between the
// writes and the reads.
// Each launch writes salt + t, so a stale value from an earlier launch shows.
__global__ void shared_sum_kernel(bool barrier, int salt, int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + salt;
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Each misuse `kind` is one that CUDA leaves undefined (or faults on).
__global__ void misuse_kernel(int kind, const float* p, float* out) {
  switch (kind) {
    case 0:  // a barrier inside a branch that half the block skips
      if (threadIdx.x < 16) __syncthreads();
      break;
    case 1:  // half the block at a barrier, the other half at a shuffle that needs the first half
      if (threadIdx.x < 16)
        __syncthreads();
      else
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
      break;
    case 2:  // a shuffle whose mask excludes the calling lane
      out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
      break;
    case 3:  // a lane of the mask that never arrives
      if (threadIdx.x != 5) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
      break;
    case 4: {  // a misaligned 16-byte load
      Vec<float, 4> v = load_vec<4>(p + 1, 0);
      out[threadIdx.x] = v.v[0];
      break;
    }
    default:  // two barriers at different sites
      if (threadIdx.x % 2)
        __syncthreads();
      else
        __syncthreads();
  }
}

at::Tensor shuffle(int64_t kind, int64_t arg, int64_t width, int64_t threads) {
  at::Tensor out = at::full({threads}, -1, at::kInt);
  fusenorm::simt::launch(shuffle_kernel, dim3(1), dim3(threads), 0, nullptr, static_cast<int>(kind),
                         static_cast<int>(arg), static_cast<int>(width), out.data_ptr<int>());
  return out;
}

at::Tensor shared_sum(bool barrier, int64_t threads, int64_t salt) {
  at::Tensor out = at::zeros({threads}, at::kInt);
  fusenorm::simt::launch(shared_sum_kernel, dim3(1), dim3(threads), 0, nullptr, barrier, static_cast<int>(salt),
                         out.data_ptr<int>());
  return out;
}

void misuse(int64_t kind) {
  at::Tensor buf = at::zeros({64}, at::kFloat);
  fusenorm::simt::launch(misuse_kernel, dim3(1), dim3(32), 0, nullptr, static_cast<int>(kind), buf.data_ptr<float>(),
                         buf.data_ptr<float>() + 32);
}

void launch_with_smem(int64_t bytes) {
  fusenorm::simt::launch(shared_sum_kernel, dim3(1), dim3(32), static_cast<size_t>(bytes), nullptr, true, 0,
                         at::zeros({32}, at::kInt).data_ptr<int>());
}

}  // namespace

FUSENORM_SIMT_FRAGMENT(FUSENORM_SIMT_NS, m) {
  m.def("probe_shuffle", &shuffle);
  m.def("probe_shared_sum", &shared_sum);
  m.def("probe_misuse", &misuse);
  m.def("probe_launch_with_smem", &launch_with_smem);
}

// Shared by the emulated-kernel libraries of tests/simt/ (built by tests/test_simt.py, never part
// of the package): the CUDA kernels of csrc/cuda/ compiled as host C++ for the emulator in
// common/simt_host.h, and the emulator's controls as ops.
#pragma once
#ifndef FUSENORM_SIMT_HOST
#error "build with -DFUSENORM_SIMT_HOST"
#endif
#include <torch/library.h>

#include <string>

#include "cuda/row_norm.cuh"

// The library's namespace: fusenorm_simt, or one per planted-bug build.
#ifndef FUSENORM_SIMT_NS
#define FUSENORM_SIMT_NS fusenorm_simt
#endif
#define FUSENORM_SIMT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FUSENORM_SIMT_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

namespace fusenorm::simt::host {

// The emulated device: multiprocessors, opt-in dynamic shared memory per block (bytes), resident
// blocks per multiprocessor, and the seed of the thread schedule.
inline void configure(int64_t sms, int64_t smem_optin, int64_t blocks_per_sm, int64_t seed) {
  options().sms = static_cast<int>(sms);
  options().smem_optin = static_cast<int>(smem_optin);
  options().blocks_per_sm = static_cast<int>(blocks_per_sm);
  options().seed = static_cast<uint64_t>(seed);
}

// The kernels launched since the last call, one per line: name, grid, block, dynamic smem.
inline std::string take_launch_log() {
  std::string s;
  for (const std::string& l : launch_log()) s += l + "\n";
  launch_log().clear();
  return s;
}

}  // namespace fusenorm::simt::host

#define FUSENORM_SIMT_CONTROLS(m)                                   \
  m.def("configure", &fusenorm::simt::host::configure);             \
  m.def("take_launch_log", &fusenorm::simt::host::take_launch_log)

using SimtOps = fusenorm::RowNormOps<fusenorm::cuda::Backend>;

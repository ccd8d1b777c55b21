// Every fusenorm schema, in one place. Implementations live in csrc/<backend>/<norm>.{cpp,cu};
// fake (meta) kernels are registered from python/fusenorm/_ops.py.
//
// Conventions:
//  * forward ops return (y, <statistics>); statistics are fp32 (fp64 for fp64 inputs) and have the
//    input's leading shape, so that backward never recomputes them.
//  * backward ops take an output mask; an output that is not asked for comes back as an empty tensor.
//  * no op mutates its arguments, so torch.compile keeps them in the graph.
#include <Python.h>
#include <torch/library.h>

#include "cpu/vec.h"  // FUSENORM_CPU_AVX2 / FUSENORM_CPU_AVX512: the widths the CPU kernels were built with

TORCH_LIBRARY(fusenorm, m) {
  // LayerNorm over the trailing dims given by normalized_shape.
  m.def("layer_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int[] normalized_shape,"
        " Tensor? weight, Tensor? bias, bool[3] output_mask) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // RMSNorm: no mean, no bias.
  m.def("rms_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor rstd, int[] normalized_shape, Tensor? weight,"
        " bool[2] output_mask) -> (Tensor dx, Tensor dweight)");
  // GroupNorm over [N, C, *] in either layout (InstanceNorm: num_groups = C); mean/rstd are [N, G].
  // activation: "none", "silu", "gelu" or "relu", applied to the affine output in the same pass.
  m.def("group_norm_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps,"
        " str activation=\"none\") -> (Tensor y, Tensor mean, Tensor rstd)");
  // group_norm_bwd's y: the forward's output, read for ReLU's mask (y > 0; needed with "relu" only).
  m.def("group_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight,"
        " Tensor? bias, Tensor? y, str activation, bool[3] output_mask) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // BatchNorm over [N, C, *] in either layout; mean/var are [C] (var biased). Training: batch_norm_fwd
  // (= stats + apply, fused where the data allows); eval: apply with the running statistics. The
  // caller updates the running statistics from the returned mean/var.
  // activation: "none" or "relu", applied after adding the optional residual: relu(bn(x) + residual).
  m.def("batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
        " str activation=\"none\") -> (Tensor y, Tensor mean, Tensor var)");
  m.def("batch_norm_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // torch.nn's running-statistics rule in place, after a training forward: running_mean =
  // (1 - momentum) running_mean + momentum mean, running_var the same with unbias * var (unbias =
  // n / (n - 1)). CPU only: small CPU ops cost microseconds each, and the four of the Python form
  // were most of a small BatchNorm's training step.
  m.def("batch_norm_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float momentum, float unbias) -> ()");
  m.def("batch_norm_apply(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual,"
        " float eps, str activation=\"none\") -> Tensor");
  // training: mean/var are the batch's (dx through them); else constants. y: the forward output (ReLU).
  // dresidual (ReLU only; without an activation it is grad_output itself) = the masked grad_output.
  m.def("batch_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? y, float eps,"
        " bool training, str activation, bool[4] output_mask)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dresidual)");
  // SyncBatchNorm's backward in two halves around the all-reduce of the sums.
  m.def("batch_norm_bwd_reduce(Tensor dy, Tensor x, Tensor mean, Tensor var, float eps)"
        " -> (Tensor sum_dy, Tensor sum_dy_xhat)");
  m.def("batch_norm_bwd_elemt(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor mean_dy,"
        " Tensor mean_dy_xhat, float eps) -> Tensor");
}

// fusenorm._C is a plain module: importing it runs the registrations above.
static struct PyModuleDef fusenorm_module = {PyModuleDef_HEAD_INIT, "_C", "fusenorm kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fusenorm_module);
  if (m == nullptr) return nullptr;
#ifdef FUSENORM_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
#if defined(FUSENORM_CPU_AVX512)
  PyModule_AddStringConstant(m, "CPU_ISA", "avx2+avx512");  // 16-wide SIMD passes
#elif defined(FUSENORM_CPU_AVX2)
  PyModule_AddStringConstant(m, "CPU_ISA", "avx2");
#else
  PyModule_AddStringConstant(m, "CPU_ISA", "baseline");
#endif
  return m;
}

"""The build itself: CUDA kernels are compiled whenever a toolkit and a CUDA torch exist."""
import os
import shutil

import pytest
import torch

import fusenorm


def test_cuda_kernels_compiled_when_possible():
    toolkit = shutil.which("nvcc") is not None or os.path.isdir("/usr/local/cuda")
    if os.environ.get("FUSENORM_CUDA") == "0":
        pytest.skip("CPU-only developer build requested (FUSENORM_CUDA=0)")
    if torch.version.cuda and toolkit:
        assert fusenorm.cuda_kernels_compiled(), "a CUDA toolkit and a CUDA torch are present, but no CUDA kernels"


def test_ops_registered_for_backends():
    for op in ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"):
        name = f"fusenorm::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == fusenorm.cuda_kernels_compiled()

"""fusenorm: fused CPU and CUDA kernels for torch.nn's normalization layers."""
from __future__ import annotations

import torch

from . import _C, _ops  # noqa: F401  (ops, fakes)
from .functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm, sync_batch_norm
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    SyncBatchNorm,
    convert,
)

__version__ = "0.1.0"


def cuda_kernels_compiled() -> bool:
    """True when this build of fusenorm contains the CUDA kernels (whether or not a GPU is present)."""
    return bool(_C.WITH_CUDA)


def cpu_isa() -> str:
    """The vector ISA the CPU kernels were compiled for: 'avx2+avx512' (16-wide SIMD passes),
    'avx2' or 'baseline'."""
    return _C.CPU_ISA


__all__ = [
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "instance_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "sync_batch_norm",
    "convert",
    "cuda_kernels_compiled",
    "cpu_isa",
]

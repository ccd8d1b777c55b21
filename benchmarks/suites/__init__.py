"""One suite module per norm; each exposes ``cases(device, full, dtypes)`` and ``peers()``."""
from __future__ import annotations

from types import ModuleType
from typing import Dict

from . import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

SUITES: Dict[str, ModuleType] = {
    "layer_norm": layer_norm,
    "rms_norm": rms_norm,
    "group_norm": group_norm,
    "instance_norm": instance_norm,
    "batch_norm": batch_norm,
}

__all__ = ["SUITES"]

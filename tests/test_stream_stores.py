"""The CPU kernels' streamed output stores (csrc/cpu/vec.h, store_out).

Passes whose output is at least FUSENORM_STREAM_BYTES (16 MiB by default) write it with
non-temporal stores. The tests' tensors are far smaller, so in the main run every pass takes the
ordinary stores. This test runs the CPU tests of every norm (SyncBatchNorm and the autograd modes included) again in a process where every output is
streamed (FUSENORM_STREAM_BYTES=0), so that the streamed path is checked against torch.nn too.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusenorm

HERE = Path(__file__).resolve().parent
FILES = ["test_layer_norm.py", "test_rms_norm.py", "test_group_norm.py", "test_instance_norm.py",
         "test_batch_norm.py", "test_sync_batch_norm.py", "test_autograd_modes.py"]


@pytest.mark.skipif(not fusenorm.cpu_isa().startswith("avx2"), reason="no SIMD passes (and no streamed stores) in this build")
def test_cpu_tests_with_every_output_streamed():
    env = dict(os.environ, FUSENORM_STREAM_BYTES="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not cuda",
         *[str(HERE / f) for f in FILES]],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail

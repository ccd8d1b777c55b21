"""Benchmark harness for fusenorm: ``PYTHONPATH=python python -m benchmarks --help``.

Kept free of torch imports so ``__main__`` can re-exec with ``MALLOC_ENV`` before torch loads.
"""
from typing import Dict

# glibc malloc tunables applied (by re-exec in __main__) before torch loads; see README.md.
MALLOC_ENV: Dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "1000000000000",  # never serve big tensors with fresh mmap()s
    "MALLOC_TRIM_THRESHOLD_": "1000000000000",  # never give freed heap memory back to the kernel
    "MALLOC_TOP_PAD_": str(256 << 20),  # grow the heap in 256 MiB steps
}

"""Build fusenorm._C: CPU kernels always, CUDA kernels when nvcc and a CUDA torch are present.

Environment switches (all optional):
  FUSENORM_CUDA=0|1        force the CUDA kernels off / on (default: on when a toolkit and a CUDA torch exist)
  TORCH_CUDA_ARCH_LIST     e.g. "9.0"; default: the visible GPUs, or "8.0;9.0" when none is visible
  MAX_JOBS                 parallel compile jobs (ninja)
  FUSENORM_NATIVE_CPU=0    do not compile the CPU kernels for this host's vector ISA (AVX2/FMA/F16C)
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script outside the toolkit breaks the guess."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.insert(0, os.path.dirname(os.path.dirname(real)))
        # a shell wrapper: read the path it execs
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.insert(0, tok[: -len("/bin/nvcc")])
        except OSError:
            pass
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("FUSENORM_CUDA", "").strip()
    if flag == "0":
        return False
    ok = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not ok:
        sys.exit("FUSENORM_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
    return ok


def _extra_cuda_includes():
    """torch's CUDA headers include cusparse.h etc.; pip's NVIDIA packages may hold them instead of the toolkit."""
    if os.path.isfile(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cusparse/include"):
            d = os.path.join(base, sub)
            if os.path.isfile(os.path.join(d, "cusparse.h")) and d not in dirs:
                dirs.append(d)
    return dirs[:1]


def _host_vector_flags():
    if os.environ.get("FUSENORM_NATIVE_CPU", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if not all(f" {x}" in flags for x in ("avx2", "fma", "f16c")):
        return []
    out = ["-mavx2", "-mfma", "-mf16c"]
    # 16-wide SIMD passes (csrc/cpu/vec.h); FUSENORM_AVX512=0 keeps them 8 wide
    if os.environ.get("FUSENORM_AVX512", "1") != "0" and all(f" {x}" in flags for x in ("avx512f", "avx512bw", "avx512vl")):
        out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=256"]
        # one-instruction bfloat16 rounding (csrc/cpu/vec.h, FUSENORM_CPU_BF16)
        if all(f" {x}" in flags for x in ("avx512_bf16", "avx512dq")):
            out += ["-mavx512bf16", "-mavx512dq"]
    return out


def _default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/common/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the CPU kernels compute exactly the operations they write (explicit
    # fmadd where they fuse), so results do not depend on how the compiler inlines and contracts
    # a * b + c (GCC contracts by default, even with -std=c++20), and a pass gives the same bits at
    # either SIMD width.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + _host_vector_flags()
    macros = []
    if _want_cuda():
        _default_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("FUSENORM_WITH_CUDA", "1"))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "fusenorm._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")] + _extra_cuda_includes(),
                define_macros=macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                py_limited_api=False,
            )
        ]
    return [
        CppExtension(
            "fusenorm._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
        )
    ]


setup(
    name="fusenorm",
    version="0.1.0",
    description="Fused CPU and CUDA kernels for the normalization layers of torch.nn",
    package_dir={"": "python"},
    packages=["fusenorm"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)

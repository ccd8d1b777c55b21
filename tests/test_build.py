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


ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "plain": []}


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
def test_cpu_sources_compile_for_other_isas(isa):
    """The CPU kernels are built for this host's ISA (AVX-512 here). The AVX2-only build
    (FUSENORM_AVX512=0) and the plain C++ build (no AVX2) compile other code paths of the same
    sources, so each CPU source is also checked under their flags (syntax and templates only, no
    code generated: about 5 s a file)."""
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(os.path.join(root, "csrc", "cpu", f) for f in os.listdir(os.path.join(root, "csrc", "cpu"))
                     if f.endswith(".cpp"))
    flags = ["-fsyntax-only", "-std=c++20", "-fopenmp", "-ffp-contract=off", f"-I{os.path.join(root, 'csrc')}",
             f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in include_paths()] + ISA_FLAGS[isa]
    procs = [(src, subprocess.Popen([cxx, *flags, src], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for src in sources]
    failed = []
    for src, p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            failed.append(f"{os.path.basename(src)}:\n" + "\n".join(line for line in out.splitlines() if "error" in line))
    assert not failed, f"CPU sources do not compile for {isa}:\n" + "\n".join(failed)

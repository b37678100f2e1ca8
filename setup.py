"""Builds the optional native extension `instrument._C`; all metadata lives in pyproject.toml.

    $ pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"

The extension is built only when torch is importable here (so never inside pip's isolated build
environment), a C++ compiler exists and INSTRUMENT_NO_EXT is not "1"; otherwise the package installs as
pure Python and `instrument.kernels` uses its PyTorch fallback.
"""
import glob
import os
import shlex
import shutil
import sys

from setuptools import setup


def native_extension():
    """(extension, None), or (None, why not) when the pure-Python package is installed."""
    if os.environ.get("INSTRUMENT_NO_EXT") == "1":
        return None, "INSTRUMENT_NO_EXT=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # a missing or broken torch must not break the install
        return None, f"torch is not importable in the build environment ({type(error).__name__}: {error})"
    compiler = shlex.split(os.environ.get("CXX") or "c++")[0]
    if not shutil.which(compiler):
        return None, f"no C++ compiler ({compiler!r} not found)"

    cxx = ["-O3", "-ffp-contract=off"]  # no FMA contraction: results must match the PyTorch fallback bit for bit
    link = []
    if sys.platform.startswith("linux") and torch._C.has_openmp:
        # at::parallel_for runs serially unless the extension itself is compiled with OpenMP (ATen/ParallelOpenMP.h)
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    sources = sorted(glob.glob("csrc/*.cpp"))  # an op is one .cpp (CPU) plus, for CUDA, one .cu
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        extension = cpp_extension.CUDAExtension(
            "instrument._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        extension = cpp_extension.CppExtension("instrument._C", sources, extra_compile_args=cxx, extra_link_args=link)
    return extension, None


extension, why_not = native_extension()
if extension is None:
    print(f"seq-instrument: installing without the native extension instrument._C: {why_not}", file=sys.stderr)
    setup()
else:
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
